"""The model registry and weights cache, and the `deer-reid` command line on a real stack."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deer_reid.bench.bare import bench_crops
from deer_reid.evaluation import calibration as cal
from shared.config import Settings
from shared.embedded import free_port
from tests.conftest import NYALA
from shared.images import model_input
from shared.models import MissingWeights, get_spec, load_configured, load_model

REPO = Path(__file__).resolve().parent.parent


def test_missing_weights_refuse_to_load_and_name_the_fix(tmp_path):
    with pytest.raises(MissingWeights) as err:
        load_model("resnet50", tmp_path)
    message = str(err.value)
    assert "--allow-random-weights" in message and "efficientnet_lite0" in message


def test_a_configured_load_follows_the_settings_and_the_callers_word_on_random_weights(tmp_path):
    settings = Settings(model_cache=tmp_path, allow_random_weights=False, precision="fp32", inference_engine="torch")
    with pytest.raises(MissingWeights):
        load_configured("resnet50", settings)
    loaded = load_configured("resnet50", settings, allow_random=True)
    assert loaded.random_weights and loaded.precision == "fp32" and loaded.engine == "torch"
    assert load_configured("resnet50", settings.model_copy(update={"allow_random_weights": True})).random_weights


def test_random_weights_only_when_asked_and_then_flagged_and_reproducible(tmp_path, jpeg_bytes):
    a = load_model("resnet50", tmp_path, allow_random=True)
    b = load_model("resnet50", tmp_path, allow_random=True)
    assert a.random_weights and "random" in a.version
    x = model_input(jpeg_bytes, a.spec.input_size)[None]
    assert np.array_equal(a.embed(x), b.embed(x))


def test_real_weights_give_the_same_embedding_across_restarts(tmp_path, jpeg_bytes):
    first = load_model("efficientnet_lite0", tmp_path)
    assert not first.random_weights
    assert first.version.startswith("efficientnet_lite0:579344248a93:")
    x = model_input(jpeg_bytes, 224)[None]
    e1 = first.embed(x)
    # A new process would load from the cache filled by the first load.
    assert (tmp_path / "efficientnet_lite0" / "efficientnet-lite0.pth").exists()
    e2 = load_model("efficientnet_lite0", tmp_path).embed(x)
    assert e1.shape == (1, 1280) and np.allclose(np.linalg.norm(e1), 1, atol=1e-5)
    assert np.array_equal(e1, e2)


def test_the_frozen_runtime_embeds_real_images_as_eager_does(monkeypatch, nyala_paths):
    import dataclasses

    from shared import models

    spec = get_spec("efficientnet_lite0")
    assert spec.runtime == "torchscript"
    images = np.stack([model_input(p.read_bytes(), spec.input_size) for p in nyala_paths[:5]])
    cache = Settings().model_cache
    frozen = load_model("efficientnet_lite0", cache, precision="fp32")
    monkeypatch.setitem(models.REGISTRY, "efficientnet_lite0", dataclasses.replace(spec, runtime="eager"))
    eager = load_model("efficientnet_lite0", cache, precision="fp32")
    assert isinstance(frozen.module, torch.jit.ScriptModule) and not isinstance(eager.module, torch.jit.ScriptModule)
    for n in (1, 5):  # the trace does not fix the batch size
        cosine = np.sum(frozen.embed(images[:n]) * eager.embed(images[:n]), axis=1)
        assert cosine.min() > 0.99999


def test_the_openvino_engine_embeds_real_images_as_torch_does(nyala_paths):
    """The same network and weights converted to OpenVINO: the same embedding version, the same vectors
    (fp32), and at bf16 as close to torch's fp32 vectors as torch's own bf16 is; any batch size runs."""
    from shared.models import OpenVinoNetwork

    spec = get_spec("efficientnet_lite0")
    images = np.stack([model_input(p.read_bytes(), spec.input_size) for p in nyala_paths[:5]])
    cache = Settings().model_cache
    reference = load_model("efficientnet_lite0", cache, precision="fp32", engine="torch")
    assert reference.engine == "torch"
    for precision, least in (("fp32", 0.9999), ("bf16", 0.99)):
        converted = load_model("efficientnet_lite0", cache, precision=precision, engine="openvino")
        assert converted.engine == "openvino" and isinstance(converted.module, OpenVinoNetwork)
        assert converted.version == reference.version
        for n in (1, 5, 3):  # the batch dimension stays dynamic
            got = converted.embed(images[:n])
            assert got.shape == (n, spec.dim) and got.dtype == np.float32
            cosine = np.sum(got * reference.embed(images[:n]), axis=1)
            assert cosine.min() > least, (precision, n, cosine)


def test_the_openvino_engine_compiles_under_the_jemalloc_the_stack_preloads():
    """oneTBB's hwloc binding, loaded with RTLD_DEEPBIND, freed jemalloc's memory with glibc's free and
    aborted the compilation ("free(): invalid pointer") in every service the stack starts."""
    from deer_reid.stack import JEMALLOC, with_jemalloc

    assert JEMALLOC.exists(), "scripts/setup.sh installs libjemalloc2"
    env = with_jemalloc({k: v for k, v in os.environ.items() if k != "TBB_ENABLE_SANITIZERS"})
    code = ("import numpy as np; from shared.config import Settings; from shared.models import load_model; "
            "m = load_model('efficientnet_lite0', Settings().model_cache, precision='bf16', engine='openvino'); "
            "print(m.engine, m.embed(np.zeros((2, 224, 224, 3), np.uint8)).shape)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["openvino", "(2,", "1280)"]


def test_a_corrupted_cache_file_is_refused(tmp_path):
    target = tmp_path / "efficientnet_lite0" / get_spec("efficientnet_lite0").weights_file
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the weights")
    with pytest.raises(MissingWeights, match="checksum"):
        load_model("efficientnet_lite0", tmp_path)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        get_spec("alexnet")


def cli(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "deer_reid.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEER_")}
    env.update({"DEER_HOME": str(tmp_path / "home"), "DEER_MODEL_CACHE": str(tmp_path / "models"),
                "DEER_API_PORT": str(free_port())})
    return env


def test_up_refuses_a_model_without_weights_and_starts_nothing(cli_env, tmp_path):
    for detach in ([], ["--detach"]):
        result = cli("up", *detach, "--body-model", "resnet50", env=cli_env)
        assert result.returncode == 2
        assert "no weights for body model 'resnet50'" in result.stderr
        assert "--body-model efficientnet_lite0" in result.stderr
        assert not (tmp_path / "home" / "run" / "stack.json").exists()


@pytest.mark.stack
def test_up_detach_then_down_leaves_no_process_behind(cli_env, tmp_path, nyala_paths):
    up = cli("up", "--detach", "--body-model", "resnet50", "--allow-random-weights", env=cli_env)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads(cli("status", env=cli_env).stdout)
    try:
        assert f"the page: {state['api_url']}/ui" in up.stdout, up.stdout  # detached, it says where the page is
        assert state["running"] and state["random_weights_allowed"]
        pids = [state["supervisor_pid"]] + [s["pid"] for s in state["services"].values()]
        pg_pid = int((tmp_path / "home" / "pg" / "postmaster.pid").read_text().split()[0])
        assert all(alive(p) for p in pids + [pg_pid])

        out = tmp_path / "out.json"
        ingest = cli("ingest", str(nyala_paths[0].parent), "--captured-at", "2025-11-01T06:00:00Z", "--wait",
                     "--json", str(out), "--quiet", "--timeout", "240", env=cli_env)
        assert ingest.returncode == 0, ingest.stderr
        report = json.loads(out.read_text())
        assert report["submitted"] == report["terminal"] > 0 and "failed" not in report["states"]
        assert set(report) >= {"submitted", "terminal", "states"}

        # sites, the calibration and the gallery, as a person at a terminal manages them
        added = cli("sites", "add", "north-feeder", "--property", "ranch", "--lat", "45.0", "--lon", "-93.0",
                    env=cli_env)
        assert added.returncode == 0, added.stderr
        listed = cli("sites", "list", env=cli_env).stdout
        assert "north-feeder" in listed and "ranch" in listed and "default" in listed
        moved = cli("sites", "add", "default", "--property", "ranch", env=cli_env)  # it has detections
        assert moved.returncode != 0 and "cannot move" in moved.stderr
        artifact = tmp_path / "cal.json"
        sims = {"body:resnet50": np.array([[1, .9, .2], [.9, 1, .3], [.2, .3, 1]])}
        cal.write_artifact(artifact, versions={"resnet50": "x"}, chosen=cal.OperatingPoint(0.8, 0.6, {}),
                           fusion=cal.fit_fusion(sims, [0, 1, 2], ["a", "a", "b"], ["1", "2", "3"]),
                           met_target=True, target=0.02, fit={}, held_out={})
        installed = cli("calibration", "install", str(artifact), env=cli_env)
        assert installed.returncode == 0 and "installed calibration" in installed.stdout, installed.stderr
        assert json.loads(cli("calibration", "show", env=cli_env).stdout)["artifact"]["thresholds"]["match"] == 0.8
        artifact.write_text("{}")
        refused = cli("calibration", "install", str(artifact), env=cli_env)
        assert refused.returncode == 2 and "not a deer-reid-calibration artifact" in refused.stderr
        rebuilt = cli("gallery", "rebuild", "--quiet", env=cli_env)
        assert rebuilt.returncode == 0, rebuilt.stderr
        gallery = json.loads(rebuilt.stdout)
        assert gallery["individuals"] > 0 and gallery["exemplars_after"] >= gallery["individuals"]
    finally:
        down = cli("down", env=cli_env)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids + [pg_pid]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids + [pg_pid] if alive(p)]


def test_weights_are_fetched_once_from_the_hub_when_allowed(tmp_path, monkeypatch):
    """The hub is a remote store, mocked: a fetched file lands in the cache with its checksum recorded."""
    import huggingface_hub
    from safetensors.torch import save_file

    from shared.models import resolve_weights

    calls = []

    def fake_download(repo_id, filename, local_dir):
        calls.append(repo_id)
        model = get_spec("vit_base_patch16_224").build()
        path = Path(local_dir) / filename
        save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = get_spec("vit_base_patch16_224")
    assert resolve_weights(spec, tmp_path, fetch=False) is None and calls == []
    path, checksum = resolve_weights(spec, tmp_path, fetch=True)
    assert calls == ["timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"]
    assert (tmp_path / "vit_base_patch16_224" / "model.safetensors.sha256").read_text().strip() == checksum
    model = load_model("vit_base_patch16_224", tmp_path, fetch=True)
    assert calls == ["timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"]  # once: the cache serves the rest
    assert not model.random_weights and model.version.startswith(f"vit_base_patch16_224:{checksum[:12]}:")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # corrupted after the first use
    with pytest.raises(MissingWeights, match="checksum"):
        load_model("vit_base_patch16_224", tmp_path)


def test_an_unreachable_hub_means_missing_weights(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MissingWeights, match="DEER_FETCH_WEIGHTS"):
        load_model("resnet50", tmp_path, fetch=True)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_home_is_accepted_before_or_after_a_nested_action():
    from deer_reid.cli import build_parser

    parser = build_parser()
    assert str(parser.parse_args(["review", "list", "--home", "/tmp/a"]).home) == "/tmp/a"
    assert str(parser.parse_args(["review", "--home", "/tmp/b", "list"]).home) == "/tmp/b"
    assert str(parser.parse_args(["keys", "create", "--owner", "x", "--home", "/tmp/c"]).home) == "/tmp/c"
    assert parser.parse_args(["sites", "list"]).home is None


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, its subcommands' names) for the parser and every parser under it."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield list(path), [name for group in groups for name in group.choices]
    for group in groups:
        for name, sub in group.choices.items():
            yield from command_paths(sub, (*path, name))


def test_every_level_has_a_help_that_lists_its_subcommands(capsys):
    """`--help` exits 0 on every command and action, and describes each subcommand on a line of its own
    (`train viewpoint` and `train soup` were once reached by rewriting argv, so `train --help` never named them)."""
    from deer_reid.cli import build_parser, main

    paths = list(command_paths(build_parser()))
    assert (["train"], ["body", "viewpoint", "soup"]) in paths
    for path, subcommands in paths:
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0, path
        text = capsys.readouterr().out
        undescribed = [name for name in subcommands if not re.search(rf"^ +{re.escape(name)}( |$)", text, re.M)]
        assert undescribed == [], f"deer-reid {' '.join(path)} --help"


def test_train_without_a_kind_trains_a_body_network():
    """The README's `deer-reid train DATA_DIR --name NAME` is `train body`; a kind named is that kind."""
    from deer_reid.cli import build_parser, train

    parser = build_parser()

    def parsed(*argv):
        return parser.parse_args(train.default_to_body(list(argv)))

    assert parsed("train", "labels", "--name", "ranch").func is train.cmd_train_body
    plain = parsed("train", "--home", "/tmp/h", "labels", "--name", "ranch")
    assert plain.func is train.cmd_train_body and plain.data_dir == "labels" and str(plain.home) == "/tmp/h"
    assert parsed("train", "viewpoint", "labels").func is train.cmd_train_viewpoint
    assert parsed("train", "soup", "s", "--from", "a", "b").ingredients == ["a", "b"]


def test_bench_re_executes_itself_with_its_own_arguments_not_the_callers(tmp_path):
    """`bench` re-executes itself under jemalloc: it passed on sys.argv, so called as main([...]) from a
    script (or a test) it ran the caller's arguments instead of its own."""
    from deer_reid.stack import JEMALLOC

    if not JEMALLOC.exists():
        pytest.fail(f"{JEMALLOC} is missing: scripts/setup.sh installs it (bench re-executes only under it)")
    out = tmp_path / "bench.json"
    script = ("import sys; sys.argv = ['a-caller', '--flag-of-the-caller']; from deer_reid.cli import main; "
              f"sys.exit(main(['bench', '--census', '60', '--json', {str(out)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["detections"] == 60


def test_bench_all_features_goes_with_the_enhanced_mode(cli_env):
    refused = cli("bench", "--mode", "fast", "--all-features", env=cli_env)
    assert refused.returncode == 2 and "--all-features goes with --mode enhanced" in refused.stderr


def test_bench_crops_are_the_folders_photos_in_a_seeded_order_then_distinct_copies(nyala_paths, tmp_path):
    for path in nyala_paths[:3]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "notes.txt").write_text("not a photo")
    crops, source = bench_crops(5, tmp_path)
    assert source == {"source": "photos", "folder": str(tmp_path)}
    assert sorted(crops[:3]) == sorted(p.read_bytes() for p in nyala_paths[:3])  # each photo once, as it is
    assert len(set(crops)) == 5 and crops == bench_crops(5, tmp_path)[0]  # then distinct images; seeded
    synthetic, source = bench_crops(2, None)
    assert source["source"] == "synthetic" and len(synthetic) == 2
    with pytest.raises(FileNotFoundError):
        bench_crops(2, tmp_path / "empty")


@pytest.mark.stack
def test_bench_all_features_measures_fast_enhanced_and_ensemble_in_one_run(cli_env, tmp_path):
    """`bench --mode enhanced --all-features`: fast mode, every enhancement with the ensemble off, and with it
    on, each on a stack of its own that decided every detection; each with its throughputs and where its
    burst's time went, the ratios between them, and the per-stage table on stderr."""
    out = tmp_path / "bench.json"
    done = cli("bench", "--mode", "enhanced", "--all-features", "--detections", "8", "--photos", str(NYALA),
               "--body-model", "efficientnet_lite0,efficientnet_lite1", "--json", str(out), env=cli_env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result
    assert result["mode"] == "enhanced" and result["all_features"] and result["detections"] == 8
    assert result["crops"] == {"source": "photos", "folder": str(NYALA)}
    assert result["cpu_model"] and result["cpu_model"] != "unknown"
    configurations = {"fast": ["efficientnet_lite0"], "enhanced": ["efficientnet_lite0"],
                      "ensemble": ["efficientnet_lite0", "efficientnet_lite1"]}
    for name, models in configurations.items():
        c = result[name]
        assert c["body_models"] == models, name
        assert sum(c["decided"].values()) == 8 and c["degraded"] == 0, (name, c["decided"], c["degraded"])
        assert c["e2e_det_per_s"] > 0 and c["bare_det_per_s"] > 0
        assert c["ratio"] == pytest.approx(c["e2e_det_per_s"] / c["bare_det_per_s"], abs=0.002)
        assert c["stages"]["body/embed"]["ms_per_det"] > 0
        assert c["cpu_ms_per_det"]["body"] > 0 and c["cpu_ms_per_det"]["fusion"] > 0
    assert result["fast"]["switches"] == {"mode": "fast", "ensemble": True, "temporal": True, "coat": False,
                                          "pose": False, "antler": False}
    every_enhancement = {"mode": "enhanced", "temporal": True, "coat": True, "pose": True, "antler": True}
    assert result["enhanced"]["switches"] == {**every_enhancement, "ensemble": False}
    assert result["ensemble"]["switches"] == {**every_enhancement, "ensemble": True}
    for name in ("enhanced", "ensemble"):  # the enhancements ran: coat and antler (the detections are bucks)
        assert {"coat/extract", "antler/geometry"} <= set(result[name]["stages"]), result[name]["stages"]
    assert "coat/extract" not in result["fast"]["stages"]
    for name in ("enhanced", "ensemble"):  # fusion's coat work, per gallery photo it matched (comparable across runs)
        c = result[name]
        assert c["coat_photos_matched_per_det"] > 0, c
        assert c["fusion_cpu_ms_per_photo_matched"] == pytest.approx(
            c["cpu_ms_per_det"]["fusion"] / c["coat_photos_matched_per_det"], rel=0.01)
    assert "coat_photos_matched_per_det" not in result["fast"]
    assert "| CPU fusion per photo matched (ms) |" in done.stderr
    assert result["enhanced_over_fast"] == pytest.approx(
        result["enhanced"]["e2e_det_per_s"] / result["fast"]["e2e_det_per_s"], abs=0.002)
    assert result["ensemble_over_bare"] == result["ensemble"]["ratio"]
    assert result["ratio_to_peer"] == pytest.approx(result["fast"]["e2e_det_per_s"] / result["peer"]["det_per_s"],
                                                    abs=0.01)
    assert "| per detection | fast | enhanced | ensemble |" in done.stderr
    assert "| stage body/embed (ms) |" in done.stderr
