"""The optimiser against the reference MeZO step, per model family (invariant 5)."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from reference_mezo import mezo_step
from tiny_models import FAMILIES, tiny_batch, tiny_model
from torch import nn

from distzo.algorithms import Probe
from distzo import directions
from distzo.directions import add_direction_, direction_like, step_seed
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.schedules import Schedule


def _run_both(model, steps, lr, eps, weight_decay=0.0, q=1, kind="gaussian"):
    ref = copy.deepcopy(model)
    opt = ZOOptimizer(model, lr=lr, eps=eps, weight_decay=weight_decay, directions=q, perturbation=kind, seed=0)
    rows = []
    for t in range(steps):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        plus, minus, grads = mezo_step(
            ref, batch, t, lr=lr, eps=eps, weight_decay=weight_decay, q=q, kind=kind, loss_fn=causal_lm_loss
        )
        rows.append((stats, plus, minus, grads))
    opt.flush()
    return model, ref, rows


def _max_weight_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_exactly_in_float64(family):
    # In float64 the only differences are MeZO's in-place drift and the stacked batch:
    # far below 1e-10.
    model, ref, rows = _run_both(tiny_model(family, dtype=torch.float64), 20, lr=1e-3, eps=1e-3, weight_decay=0.1)
    for stats, plus, minus, grads in rows:
        assert stats.losses_plus == pytest.approx(plus, abs=1e-11)
        assert stats.losses_other == pytest.approx(minus, abs=1e-11)
        assert stats.projected_grads == pytest.approx(grads, abs=1e-8)
    assert _max_weight_diff(model, ref) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_in_float32(family):
    # fp32 losses (~4.6) agree to a few dozen ulp (the stacked 2R-row forward reduces in
    # another order); g = dL / 2eps divides that by 2e-3, and the weights move by lr * g * z.
    model, ref, rows = _run_both(tiny_model(family), 20, lr=1e-3, eps=1e-3, weight_decay=0.1)
    for stats, plus, minus, grads in rows:
        assert stats.losses_plus == pytest.approx(plus, abs=2e-5)
        assert stats.losses_other == pytest.approx(minus, abs=2e-5)
        assert stats.projected_grads == pytest.approx(grads, abs=2e-2)
    assert _max_weight_diff(model, ref) < 2e-5


@pytest.mark.parametrize("kind", directions.KINDS)
def test_many_directions_match_reference(kind):
    model, ref, rows = _run_both(tiny_model("llama", dtype=torch.float64), 5, lr=1e-3, eps=1e-3, q=3, kind=kind)
    for stats, plus, minus, grads in rows:
        assert len(stats.projected_grads) == 3
        assert stats.projected_grads == pytest.approx(grads, abs=1e-8)
    assert _max_weight_diff(model, ref) < 1e-12


def test_lora_only_adapters_perturbed():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", dtype=torch.float64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # peft initialises B to zero; give it values so the adapters matter.
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model2, ref, rows = _run_both(model, 10, lr=1e-2, eps=1e-3)
    opt_names = [n for n, p in model2.named_parameters() if p.requires_grad]
    assert opt_names and all("lora_" in n for n in opt_names)
    for n, p in model2.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for stats, plus, minus, grads in rows:
        assert stats.projected_grads == pytest.approx(grads, abs=1e-8)
    assert _max_weight_diff(model2, ref) < 1e-12


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_dual_stream_equals_two_plain_forwards(family):
    model = tiny_model(family)
    batch = tiny_batch(rows=4, seed=3)
    opt = ZOOptimizer(model, eps=1e-2)
    seed = step_seed(0, 0, 0)
    expected = []
    for sign in (1, -1):
        copy_ = copy.deepcopy(model)
        for p in opt.params:
            add_direction_(dict(copy_.named_parameters())[p.name].data, seed, p.key, sign * 1e-2)
        out = copy_(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expected.append(float(causal_lm_loss(out, batch)))
    stats = opt.step(batch)
    assert stats.losses_plus[0] == pytest.approx(expected[0], abs=2e-5)
    assert stats.losses_other[0] == pytest.approx(expected[1], abs=2e-5)
    assert abs(expected[0] - expected[1]) > 1e-3  # the perturbation is visible at all


def test_tied_weights_share_one_direction():
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = ZOOptimizer(model)
    names = [p.name for p in opt.params]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    units_with_embedding = [u.name for u in opt.units if any(n == "model.embed_tokens.weight" for *_, n in u.slots)]
    assert units_with_embedding == ["model.embed_tokens", "lm_head"]


def test_evaluation_never_changes_bf16_weights():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ZOOptimizer(model, eps=1e-3)
    batch = {"input_ids": torch.randint(0, 31, (2, 4))}
    for t in range(1000):
        seed = step_seed(0, t, 0)
        opt.stream_losses(batch, (Probe(seed, 1e-3), Probe(seed, -1e-3)))
        opt._z.clear()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_loss_skips_update_and_keeps_weights():
    model = tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def nan_loss(outputs, batch):
        calls["n"] += 1
        return causal_lm_loss(outputs, batch) * float("nan")

    opt = ZOOptimizer(model, lr=1.0, loss_fn=nan_loss)
    with pytest.warns(UserWarning, match="non-finite loss"):
        stats = opt.step(tiny_batch())
    opt.flush()
    assert stats.skipped and calls["n"] == 2 and opt.pending is None and opt.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_trainable_parameters_is_an_error():
    model = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ZOOptimizer(model)


class _BypassesChild(nn.Module):
    """Uses its child's weight directly instead of calling the child."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, input_ids, **_):
        hidden = self.emb(input_ids)
        return SimpleNamespace(logits=nn.functional.linear(hidden, self.head.weight, self.head.bias))


def test_unit_used_outside_its_forward_is_an_error():
    opt = ZOOptimizer(_BypassesChild(), loss_fn=lambda out, batch: out.logits.float().mean())
    with pytest.raises(RuntimeError, match="never called unit"):
        opt.step({"input_ids": torch.randint(0, 10, (2, 3))})


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr"), ({"eps": 0.0}, "eps"), ({"directions": 0}, "directions"),
    ({"perturbation": "laplace"}, "perturbation kind"), ({"estimator": "three-sided"}, "estimator"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOOptimizer(tiny_model("llama"), **kwargs)


def test_one_sided_estimator():
    model = tiny_model("llama", dtype=torch.float64)
    opt = ZOOptimizer(model, eps=1e-3, estimator="one-sided")
    batch = tiny_batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    base = float(causal_lm_loss(out, batch))
    stats = opt.step(batch)
    assert stats.losses_other[0] == pytest.approx(base, abs=1e-12)
    assert stats.projected_grads[0] == pytest.approx((stats.losses_plus[0] - base) / 1e-3, abs=1e-6)


def test_state_dict_round_trip_and_pending_update():
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    opt = ZOOptimizer(model, lr=1e-3, schedule=Schedule("cosine", warmup_steps=2, total_steps=10))
    opt.step(tiny_batch(seed=0))
    state = opt.state_dict()
    assert state["pending"] is not None and state["step"] == 1
    other = ZOOptimizer(twin, lr=5.0)
    other.load_state_dict(state)
    opt.flush()
    other.flush()
    assert _max_weight_diff(model, twin) == 0.0
    a, b = opt.step(tiny_batch(seed=1)), other.step(tiny_batch(seed=1))
    assert a.seeds == b.seeds and a.projected_grads == b.projected_grads and a.lr == b.lr


def test_gradient_estimate_approaches_autograd():
    # With n gaussian directions, E[g z] = grad and cos(estimate, grad) ~ sqrt(n / (n + P)).
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=8, num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    batch = {"input_ids": torch.randint(0, 13, (2, 5))}
    model.zero_grad()
    causal_lm_loss(model(input_ids=batch["input_ids"]), batch).backward()
    named = [(n, p) for n, p in model.named_parameters()]
    grad = torch.cat([p.grad.reshape(-1) for _, p in named])
    n_dirs = 1500
    opt = ZOOptimizer(model, eps=1e-4, directions=n_dirs)
    stats = opt.step(batch)
    estimate = torch.zeros_like(grad)
    for j, g in enumerate(stats.projected_grads):
        z = torch.cat([direction_like(p, stats.seeds[j], q.key).double().reshape(-1) for (_, p), q in zip(named, opt.params)])
        estimate += g * z / n_dirs
    cosine = float(torch.nn.functional.cosine_similarity(estimate, grad, dim=0))
    expected = math.sqrt(n_dirs / (n_dirs + grad.numel()))
    assert grad.numel() < 600
    assert cosine > 0.8 * expected, (cosine, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streams_of_any_count_agree(family):
    # one stream per probe: K = 1 (one side of a pair), K = 3, and probes of different seeds
    # in one forward give the losses each probe has on its own
    model = tiny_model(family, dtype=torch.float64)
    opt = ZOOptimizer(model, eps=1e-3)
    batch = tiny_batch(rows=3)
    seed, other = step_seed(0, 0, 0), step_seed(0, 0, 1)
    plus, minus = opt.stream_losses(batch, (Probe(seed, 1e-3), Probe(seed, -1e-3)))
    assert opt.stream_losses(batch, (Probe(seed, 1e-3),)) == pytest.approx([plus], abs=1e-12)
    assert opt.stream_losses(batch, (Probe(seed, -1e-3),)) == pytest.approx([minus], abs=1e-12)
    three = opt.stream_losses(batch, (Probe(seed, -1e-3), Probe(seed, 0.0), Probe(seed, 1e-3)))
    assert three == pytest.approx([minus, three[1], plus], abs=1e-12)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert three[1] == pytest.approx(float(causal_lm_loss(out, batch)), abs=1e-12)
    (alone,) = opt.stream_losses(batch, (Probe(other, 1e-3),))
    mixed = opt.stream_losses(batch, (Probe(seed, 1e-3), Probe(other, 1e-3), Probe(other, 0.0)))
    assert mixed == pytest.approx([plus, alone, three[1]], abs=1e-12)
    assert alone != pytest.approx(plus, abs=1e-9)  # the other seed is another direction


def test_chunked_lm_loss_equals_the_one_shot_loss(monkeypatch):
    import distzo.optimizer as optimizer

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 97, dtype=torch.float64)
    batch = tiny_batch(rows=3, seq=9)
    whole = optimizer.causal_lm_loss(SimpleNamespace(logits=logits), batch)
    monkeypatch.setattr(optimizer, "LOSS_CHUNK", 2 * 97 + 5)  # two positions at a time
    chunked = optimizer.causal_lm_loss(SimpleNamespace(logits=logits), batch)
    assert float(chunked) == pytest.approx(float(whole), abs=1e-14)


@pytest.mark.parametrize("batch_streams", [False, True])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lean_units_give_the_same_results(family, batch_streams):
    # One stream's shadows at a time (what offloaded blocks do) changes no bit; with batch_streams,
    # one stream's shadows of each perturbed layer at a time.
    model = tiny_model(family)
    lean = copy.deepcopy(model)
    a = ZOOptimizer(model, lr=1e-3, eps=1e-3, seed=0, batch_streams=batch_streams)
    b = ZOOptimizer(lean, lr=1e-3, eps=1e-3, seed=0, batch_streams=batch_streams)
    assert bool(b._stream.batched) == batch_streams
    b._stream.lean = lambda unit: True
    for t in range(4):
        assert a.step(tiny_batch(seed=t)).projected_grads == b.step(tiny_batch(seed=t)).projected_grads
    a.flush(), b.flush()
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), lean.parameters()))


def test_fused_passes_group_the_probes_of_a_unit_call():
    """The GPU passes a unit call makes (``optimizer._launches``): each nonzero-scale probe gets its
    shadow from exactly one pass, a seed's two shadows share a pass, seeds with as many shadows
    share one up to the limit, and theta itself (scale 0) takes none."""
    from distzo.optimizer import _launches

    fzoo = (Probe(1, 0.0),) + tuple(Probe(10 + i, 1e-3 * (i + 1)) for i in range(20))
    passes = _launches(fzoo, 16)
    assert [len(p.seeds) for p in passes] == [16, 4]
    assert [s for p in passes for s in p.slots] == [(k,) for k in range(1, 21)]
    assert all(pair == (fzoo[slots[0]].scale, 0.0) for p in passes for slots, pair in zip(p.slots, p.scales))
    two_sided = (Probe(5, 1e-3), Probe(5, -1e-3), Probe(6, 1e-3), Probe(6, -1e-3))
    assert [(p.seeds, p.slots, p.scales) for p in _launches(two_sided, 16)] == [
        ((5, 6), ((0, 1), (2, 3)), ((1e-3, -1e-3), (1e-3, -1e-3)))]
    mixed = (Probe(5, 1e-3), Probe(5, -1e-3), Probe(7, 0.0), Probe(6, 2e-3), Probe(5, 3e-3))
    assert [(p.seeds, p.slots) for p in _launches(mixed, 16)] == [((5,), ((0, 1),)), ((5, 6), ((4,), (3,)))]
    assert _launches((Probe(3, 0.0),), 16) == ()
