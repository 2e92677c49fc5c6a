"""The model card in every checkpoint training writes: what the Hub reads, and what a reader needs."""

import json

import torch
import transformers
from huggingface_hub import ModelCard
from test_trainer import _args

from distzo import __version__
from distzo.cli import main
from distzo.config import TrainConfig
from distzo.modelcard import model_card
from distzo.models import ModelConfig
from distzo.tasks import TaskConfig


def test_both_checkpoints_carry_a_card_of_their_own_state(tiny_model_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "4", "--eval-every", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    last = ModelCard.load(out / "checkpoints" / "last" / "README.md")
    best = ModelCard.load(out / "checkpoints" / "best" / "README.md")
    for card in (last, best):
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        assert {"distzo", "zeroth-order", "sst2"} <= set(card.data.tags)
        assert card.data.base_model is None and card.data.datasets is None  # a local model, local data
        assert f"# {tiny_model_dir.name} fine-tuned on sst2" in card.text
        assert f"local data `{sst2_dir}`" in card.text and "| optim.eps | `0.01` |" in card.text
        assert f"| zero-shot | test | accuracy | {results['zero_shot']['accuracy']:.4f} |" in card.text
        assert f"distzo {__version__}, torch {torch.__version__}, transformers {transformers.__version__}" in card.text
    step = results["best_dev"]["step"]
    at_best = f"| at best dev (step {step}) | test | accuracy | {results['test_at_best_dev']['accuracy']:.4f} |"
    assert at_best in last.text and at_best in best.text
    assert f"| final (step 4) | test | accuracy | {results['final']['accuracy']:.4f} |" in last.text
    assert "| final" not in best.text and f"Saved at step {step} of 4: the final test metrics come later" in best.text
    assert "| steps | 4 of 4," in last.text and f"| steps | {step} of 4," in best.text


def test_a_hub_model_and_dataset_are_named_in_the_front_matter():
    cfg = TrainConfig(model=ModelConfig(name="facebook/opt-125m"), task=TaskConfig(name="sst2"), use_lora=True,
                      push_to_hub="someone/opt-sst2")
    card = ModelCard(model_card(cfg, {"step": 0, "zero_shot": None, "best": None}))
    assert card.data.base_model == "facebook/opt-125m" and card.data.datasets == ["nyu-mll/glue"]
    assert "lora" in card.data.tags and "LoRA adapters (r " in card.text
    assert 'from_pretrained("someone/opt-sst2")' in card.text and "No evaluation yet at step 0 of 120." in card.text
