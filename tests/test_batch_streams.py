"""optim.batch_streams: a block runs once over all probes' rows, only the layers owning perturbed
parameters stream by stream (distzo.units). Checked against the reference MeZO step in float64,
where the frozen products over 2R rows instead of R change nothing but rounding far below the
tolerances of the unbatched engine's own reference tests."""

import copy
from types import SimpleNamespace

import pytest
import torch
from reference_mezo import mezo_step
from tiny_models import FAMILIES, tiny_batch, tiny_model
from torch import nn

from distzo.algorithms import Probe
from distzo.directions import step_seed
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.units import UnsupportedModel

peft = pytest.importorskip("peft")


def _lora(model, **extra):
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       **extra))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft initialises B to zero; give it values so the adapters matter
            p.data.normal_(0, 0.1)
    return model


def _against_reference(model, steps=20, **kwargs):
    """(stats, plus, minus, grads) per step of a batched run and of the reference on a copy."""
    ref = copy.deepcopy(model)
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-3, weight_decay=0.1, seed=0, batch_streams=True, **kwargs)
    assert opt._stream.batched, "no unit runs batched: the test would check the unbatched engine"
    rows = []
    for t in range(steps):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        rows.append((stats, *mezo_step(ref, batch, t, lr=1e-3, eps=1e-3, weight_decay=0.1,
                                       q=kwargs.get("directions", 1), loss_fn=causal_lm_loss)))
    opt.flush()
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
    return rows, diff


# gpt2's projections are transformers' Conv1D, not batchable: its blocks run as without the setting
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_full_parameter_run_matches_reference_in_float64(family):
    rows, diff = _against_reference(tiny_model(family, dtype=torch.float64))
    for stats, plus, minus, grads in rows:
        assert stats.losses_plus == pytest.approx(plus, abs=1e-11)
        assert stats.losses_other == pytest.approx(minus, abs=1e-11)
        assert stats.projected_grads == pytest.approx(grads, abs=1e-8)
    assert diff < 1e-12


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lora_run_matches_reference_in_float64(family):
    rows, diff = _against_reference(_lora(tiny_model(family, dtype=torch.float64)), directions=2)
    for stats, plus, minus, grads in rows:
        assert stats.projected_grads == pytest.approx(grads, abs=1e-8)
    assert diff < 1e-12


def test_the_frozen_base_runs_once_a_forward():
    model = _lora(tiny_model("llama", dtype=torch.float64))
    calls = []
    for name, module in model.named_modules():
        if name.endswith("layers.0.self_attn.q_proj.base_layer") or name.endswith("layers.0.mlp.down_proj"):
            module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[0].shape[0])))
    batch = tiny_batch(rows=3)
    seed = step_seed(0, 0, 0)
    probes = (Probe(seed, 1e-3), Probe(seed, -1e-3), Probe(seed, 0.0))
    batched = ZOOptimizer(model, eps=1e-3, batch_streams=True).stream_losses(batch, probes)
    assert sorted(calls) == sorted([(n, 9) for n, _ in calls])  # one call a layer, over the 3 x 3 rows
    assert len(calls) == 2
    calls.clear()
    plain = ZOOptimizer(model, eps=1e-3).stream_losses(batch, probes)
    assert len(calls) == 6 and all(rows == 3 for _, rows in calls)  # once a stream
    assert batched == pytest.approx(plain, abs=1e-12)
    assert batched[0] != pytest.approx(batched[1], abs=1e-9)  # the probes are seen at all


def test_streams_of_any_count_agree_with_unbatched():
    model = tiny_model("llama", dtype=torch.float64)
    plain, batched = ZOOptimizer(model, eps=1e-3), ZOOptimizer(model, eps=1e-3, batch_streams=True)
    batch = tiny_batch(rows=3)
    seed, other = step_seed(0, 0, 0), step_seed(0, 0, 1)
    for probes in [(Probe(seed, 1e-3),), (Probe(seed, -1e-3), Probe(seed, 0.0), Probe(seed, 1e-3)),
                   (Probe(seed, 1e-3), Probe(other, 1e-3), Probe(other, 0.0), Probe(seed, -1e-3))]:
        assert batched.stream_losses(batch, probes) == pytest.approx(plain.stream_losses(batch, probes), abs=1e-12)


def test_layers_read_from_outside_keep_their_units_whole():
    # DoRA's magnitude reads the adapters' weights outside their own forward: such a block must
    # see every stream's shadows for the whole call, so it runs stream by stream, bit for bit
    model = _lora(tiny_model("llama"), use_dora=True)
    twin = copy.deepcopy(model)
    a = ZOOptimizer(model, lr=1e-3, eps=1e-3, batch_streams=True)
    b = ZOOptimizer(twin, lr=1e-3, eps=1e-3)
    assert not a._stream.batched
    for t in range(3):
        assert a.step(tiny_batch(seed=t)).projected_grads == b.step(tiny_batch(seed=t)).projected_grads


class _SequenceMajor(nn.Module):
    """A model whose block hands its perturbed linear layer the sequence dimension first."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.emb.weight.requires_grad_(False)
        self.layers = nn.ModuleList([_SequenceMajorBlock()])

    def forward(self, input_ids, **_):
        hidden = self.emb(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return SimpleNamespace(logits=hidden)


class _SequenceMajorBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden):
        return self.proj(hidden.transpose(0, 1)).transpose(0, 1)


def test_a_layer_called_without_the_rows_is_one_clear_error():
    model = _SequenceMajor()
    opt = ZOOptimizer(model, eps=1e-3, batch_streams=True, loss_fn=lambda out, batch: out.logits.float().mean())
    with pytest.raises(UnsupportedModel, match="without optim.batch_streams"):
        opt.step({"input_ids": torch.randint(0, 10, (2, 3))})
    stats = ZOOptimizer(model, eps=1e-3, loss_fn=lambda out, batch: out.logits.float().mean()).step(
        {"input_ids": torch.randint(0, 10, (2, 3))})  # unbatched, the same model steps
    assert not stats.skipped and len(stats.losses[0]) == 2
