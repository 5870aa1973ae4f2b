"""The tree keeps the architecture: each service imports only its own folder and `shared/`, and `shared/`
imports no service (what two services need lives in `shared/`, so a container carries one service's code
and a change inside one service cannot break another unseen)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "services"]
    return out


def crossings(root: Path) -> list[str]:
    """Imports that cross the boundaries, as 'file:line imports module'."""
    bad = []
    for path in sorted((root / "services").rglob("*.py")) + sorted((root / "shared").rglob("*.py")):
        rel = path.relative_to(root)
        own = rel.parts[1] if rel.parts[0] == "services" and len(rel.parts) > 2 else None
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] != "services" or len(parts) < 2 and own is not None:
                continue
            if own is None or parts[1] != own:
                bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_services_import_only_their_own_folder_and_shared():
    assert crossings(ROOT) == []


def test_the_check_finds_a_crossing(tmp_path):
    (tmp_path / "services" / "fusion").mkdir(parents=True)
    (tmp_path / "services" / "coat").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "services" / "fusion" / "own.py").write_text("from services.fusion import store\nimport shared.db\n")
    (tmp_path / "services" / "fusion" / "bad.py").write_text(
        "def f():\n    from services.coat.pattern import unpack\n")
    (tmp_path / "services" / "coat" / "bad.py").write_text("from services import fusion\n")
    (tmp_path / "shared" / "bad.py").write_text("import services.pose.viewpoint\n")
    assert crossings(tmp_path) == ["services/coat/bad.py:1 imports services.fusion",
                                   "services/fusion/bad.py:2 imports services.coat.pattern",
                                   "shared/bad.py:1 imports services.pose.viewpoint"]


def diagram() -> tuple[dict[str, str], set[tuple[str, str]]]:
    """The README's architecture picture: {node id: label} and the (from, to) arrows."""
    import re

    text = (ROOT / "README.md").read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    nodes, edges = {}, set()
    node = r"(\w+)(?:\[([^\]]+)\]|\(\(?\[?([^)\]]+)\]?\)?\))?"
    for line in block.splitlines()[1:]:
        m = re.fullmatch(rf"\s*{node}\s*(?:--\s*\"[^\"]*\"\s*-->|-->)\s*{node}\s*", line)
        if not m:
            continue
        a, b = m.group(1), m.group(4)
        for ident, label in ((a, m.group(2) or m.group(3)), (b, m.group(5) or m.group(6))):
            if label:
                nodes[ident] = label
        edges.add((a, b))
    return nodes, edges


def produced(service: str) -> set[str]:
    """Topic constants a service's code sends to (handler outputs and producer sends)."""
    import re

    out = set()
    for path in (ROOT / "services" / service).rglob("*.py"):
        text = path.read_text()
        out |= set(re.findall(r"Output\(\s*([A-Z_]+)\b", text))
        out |= set(re.findall(r"\.send(?:_and_wait)?\(\s*([A-Z_]+)\.name", text))
    return out


def test_the_readmes_architecture_picture_matches_the_code():
    from deer_reid.stack import SERVICES
    from services.antler.service import AntlerHandler
    from services.body.service import BodyHandler
    from services.coat.service import CoatHandler
    from services.fusion.service import FusionHandler
    from services.pose.service import PoseHandler
    from services.reconciler.service import Reconciler
    from shared import topics

    nodes, edges = diagram()
    assert nodes and edges, "no mermaid picture found in the README"
    by_label = {label: ident for ident, label in nodes.items()}
    services = {ident for ident, label in nodes.items() if label == ident}
    assert services == set(SERVICES), "the picture's services are not those `deer-reid up` starts"
    named_topics = {name: t.name for name, t in vars(topics).items() if isinstance(t, topics.Topic)}
    assert {label for label in nodes.values() if label.startswith("deer.")} == set(named_topics.values())
    dead_letters = next(i for i, label in nodes.items() if label.endswith(".dlq"))
    handlers = {"body": BodyHandler, "coat": CoatHandler, "antler": AntlerHandler, "pose": PoseHandler,
                "fusion": FusionHandler, "reconciler": Reconciler}
    for service, handler in handlers.items():
        consumed = {by_label[t.name] if not t.name.endswith(".dlq") else dead_letters for t in handler.input_topics}
        drawn_in = {a for a, b in edges if b == service}
        assert drawn_in == consumed, (service, drawn_in, consumed)
    for service in SERVICES:
        sent = {by_label[named_topics[name]] for name in produced(service)}
        drawn_out = {b for a, b in edges if a == service and nodes.get(b, "").startswith("deer.")}
        assert drawn_out == sent, (service, drawn_out, sent)
