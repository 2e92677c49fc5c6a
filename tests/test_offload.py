"""The offload engine: offloaded training equals resident training, step for step (invariant 5)."""

import copy

import pytest
import torch
from reference_mezo import mezo_step
from tiny_models import FAMILIES, tiny_batch, tiny_model

from distzo.offload import OffloadConfig, OffloadEngine, build_on_meta, parse_bytes, random_init
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.units import UnsupportedModel


def _train(model, steps, offload=None, **kwargs):
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-3, weight_decay=0.1, seed=0, offload=offload, **kwargs)
    stats = [opt.step(tiny_batch(seed=t)) for t in range(steps)]
    opt.flush()
    return stats


def _twins(family: str, prefetch: int = 1, write_every: int = 1):
    """A tiny model, and a copy of it whose blocks the engine offloads (on the CPU)."""
    resident = tiny_model(family)
    offloaded = copy.deepcopy(resident)
    cfg = OffloadConfig("cpu", prefetch=prefetch, write_every=write_every)
    return resident, offloaded, OffloadEngine(offloaded, "cpu", cfg)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_training_equals_resident_bit_for_bit(family):
    resident, offloaded, engine = _twins(family)
    a, b = _train(resident, 6), _train(offloaded, 6, engine)
    for x, y in zip(a, b):
        assert (x.losses_plus, x.losses_other, x.projected_grads) == (y.losses_plus, y.losses_other, y.projected_grads)
    assert _same_weights(resident, offloaded)
    # every block crossed once up and (from the second step, which carries an update) once down
    block = engine.blocks[0].nbytes
    assert engine.bytes_up >= 6 * len(engine.blocks) * block


def test_offloaded_matches_the_reference_in_float64():
    model = tiny_model("llama", dtype=torch.float64)
    ref = copy.deepcopy(model)
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu", prefetch=2))
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-3, weight_decay=0.1, seed=0, offload=engine, directions=2)
    for t in range(8):
        batch = tiny_batch(seed=t)
        stats = opt.step(batch)
        plus, minus, grads = mezo_step(ref, batch, t, lr=1e-3, eps=1e-3, weight_decay=0.1, q=2, loss_fn=causal_lm_loss)
        assert stats.losses_plus == pytest.approx(plus, abs=1e-11)
        assert stats.losses_other == pytest.approx(minus, abs=1e-11)
        assert stats.projected_grads == pytest.approx(grads, abs=1e-8)
    opt.flush()
    assert max(float((x - y).detach().abs().max()) for x, y in zip(model.parameters(), ref.parameters())) < 1e-12


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_depth_changes_nothing(prefetch):
    resident, offloaded, engine = _twins("opt", prefetch)
    assert len(engine.slots) == prefetch + 1
    a, b = _train(resident, 4), _train(offloaded, 4, engine)
    assert [s.projected_grads for s in a] == [s.projected_grads for s in b]
    assert _same_weights(resident, offloaded)


def test_prefetch_depth_changes_between_steps():
    resident, offloaded, engine = _twins("opt", prefetch=1)
    a = ZOOptimizer(resident, lr=1e-3, eps=1e-3, seed=0)
    b = ZOOptimizer(offloaded, lr=1e-3, eps=1e-3, seed=0, offload=engine)
    for t, depth in enumerate([1, 3, 0, 2]):
        engine.set_prefetch(depth)
        assert len(engine.slots) == depth + 1
        assert a.step(tiny_batch(seed=t)).projected_grads == b.step(tiny_batch(seed=t)).projected_grads
    a.flush(), b.flush()
    assert _same_weights(resident, offloaded)
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        engine.set_prefetch(-1)


@pytest.mark.parametrize("write_every", [2, 3])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_deferred_write_back_changes_nothing(family, write_every):
    # Between write-backs the host copy lacks the last updates; the engine re-applies them
    # each time the block comes up, so every step sees the resident weights exactly.
    resident, offloaded, engine = _twins(family, write_every=write_every)
    a = ZOOptimizer(resident, lr=1e-3, eps=1e-3, weight_decay=0.1, seed=0)
    b = ZOOptimizer(offloaded, lr=1e-3, eps=1e-3, weight_decay=0.1, seed=0, offload=engine)
    steps = 8  # 7 updates: a remainder is still missing from the host copies at the end
    for t in range(steps):
        sa, sb = a.step(tiny_batch(seed=t)), b.step(tiny_batch(seed=t))
        assert (sa.losses_plus, sa.losses_other, sa.projected_grads) == (
            sb.losses_plus, sb.losses_other, sb.projected_grads)
    # steps 1..7 each applied one update to every block; block i wrote back at updates n with
    # (n + i) % write_every == 0 (the blocks take turns)
    written = [sum((n + blk.index) % write_every == 0 for n in range(1, steps)) for blk in engine.blocks]
    assert engine.bytes_down == sum(w * e.numel * e.param.element_size()
                                    for w, blk in zip(written, engine.blocks) for e in blk.entries)
    stale = [blk for blk in engine.blocks if any(blk.stale.values())]
    assert stale and not torch.equal(stale[0].flat, _host_view(resident, engine, stale[0]))
    a.flush(), b.flush()
    assert not any(any(blk.stale.values()) for blk in engine.blocks)
    assert _same_weights(resident, offloaded)  # read from the host copies


def _host_view(resident, engine, block):
    """The resident model's values of ``block``, laid out as the engine's flat buffer."""
    flat = torch.zeros_like(block.flat)
    params = dict(resident.named_parameters())
    for e in block.entries:
        flat[e.offset : e.offset + e.numel] = params[e.name].detach().reshape(-1)
    return flat


def test_deferred_write_back_survives_eval_and_promotion():
    resident, offloaded, engine = _twins("opt", write_every=3)
    a = ZOOptimizer(resident, lr=1e-3, eps=1e-3, seed=0)
    b = ZOOptimizer(offloaded, lr=1e-3, eps=1e-3, seed=0, offload=engine)
    batch = tiny_batch()
    for t in range(6):
        if t == 3:
            engine.promote(1)  # writes back what the host copy lacks first
        sa, sb = a.step(tiny_batch(seed=t)), b.step(tiny_batch(seed=t))
        assert sa.projected_grads == sb.projected_grads
        with torch.no_grad():  # a forward between steps sees the current weights
            assert torch.equal(resident(**batch).logits, offloaded(**batch).logits)
    a.flush(), b.flush()
    assert _same_weights(resident, offloaded)


def test_blocks_live_on_the_host_between_forwards():
    model = tiny_model("llama")
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"))
    assert (len(engine.slots), engine.write_every) == (2, 4)  # the defaults on one device
    for block in engine.blocks:
        for e in block.entries:  # every parameter is a view of its block's one flat buffer
            assert e.param.data.untyped_storage().data_ptr() == block.flat.untyped_storage().data_ptr()


def test_eval_and_flush_go_through_the_engine():
    resident, offloaded, engine = _twins("llama")
    a = ZOOptimizer(resident, lr=1e-2, eps=1e-3, seed=3)
    b = ZOOptimizer(offloaded, lr=1e-2, eps=1e-3, seed=3, offload=engine)
    batch = tiny_batch()
    for opt in (a, b):
        opt.step(batch)
        opt.step(batch)  # leaves an update pending
        opt.flush()
    with torch.no_grad():
        assert torch.equal(resident(**batch).logits, offloaded(**batch).logits)
    assert _same_weights(resident, offloaded)


def test_promoted_blocks_give_the_same_results():
    resident, offloaded, engine = _twins("opt")
    opt_a = ZOOptimizer(resident, lr=1e-3, eps=1e-3, seed=0)
    opt_b = ZOOptimizer(offloaded, lr=1e-3, eps=1e-3, seed=0, offload=engine)
    for t in range(5):
        if t == 2:
            engine.promote(1)
            assert engine.resident_blocks == 1 and len(engine.streamed) == 1
        sa, sb = opt_a.step(tiny_batch(seed=t)), opt_b.step(tiny_batch(seed=t))
        assert sa.projected_grads == sb.projected_grads
    opt_a.flush(), opt_b.flush()
    assert _same_weights(resident, offloaded)


@pytest.mark.parametrize("write_every", [1, 2])
def test_lora_offload_writes_back_only_what_changed(write_every):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    other = copy.deepcopy(base)
    engine = OffloadEngine(other, "cpu", OffloadConfig("cpu", write_every=write_every))
    a, b = _train(base, 4), _train(other, 4, engine)
    assert [s.projected_grads for s in a] == [s.projected_grads for s in b]
    assert _same_weights(base, other)
    trainable = sum(e.numel for e in engine.blocks[0].entries if e.param.requires_grad)
    per_step = sum(trainable * 4 for _ in engine.blocks)
    assert 0 < engine.bytes_down <= 4 * per_step  # adapters only: the frozen base never goes down


def test_random_init_from_meta_keeps_no_meta_tensor():
    from tiny_models import _config

    model = build_on_meta(_config("opt"), dtype=torch.float32)
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"), init=random_init())
    assert not any(p.is_meta for p in model.parameters())
    stats = ZOOptimizer(model, lr=1e-3, eps=1e-3, offload=engine).step(tiny_batch())
    assert all(torch.isfinite(torch.tensor(stats.losses_plus + stats.losses_other)))


def test_meta_model_without_init_is_an_error():
    from tiny_models import _config

    with pytest.raises(ValueError, match="meta device"):
        OffloadEngine(build_on_meta(_config("opt")), "cpu", OffloadConfig("cpu"))


def test_model_without_a_layer_stack_is_an_error():
    with pytest.raises(UnsupportedModel, match="stack"):
        OffloadEngine(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu", OffloadConfig("cpu"))


@pytest.mark.parametrize("text,expected", [("18GiB", 18 * 2**30), ("16GB", 16 * 10**9), ("512MiB", 2**29),
                                           ("1.5gib", int(1.5 * 2**30)), ("", None), (1024, 1024)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("kwargs,match", [({"mode": "disk"}, "offload.mode"), ({"prefetch": -1}, "prefetch"),
                                          ({"write_every": 0}, "write_every"),
                                          ({"gpu_memory": "lots"}, "memory size"), ({"gpu_memory": "0GB"}, "positive")])
def test_bad_offload_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**kwargs)


# ---------------------------------------------------------------- on a GPU (skipped without CUDA)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prefetch,write_every", [(0, 1), (1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_gpu_offloaded_equals_gpu_resident(family, prefetch, write_every, dtype):
    # Pinned host blocks, three streams and events: the same fused kernels on the same
    # values, so the same bits as the resident engine on the same GPU (also when updates
    # are re-applied on the GPU between write-backs).
    base = tiny_model(family, dtype=dtype)
    resident = copy.deepcopy(base).cuda()
    engine = OffloadEngine(base, "cuda", OffloadConfig("cpu", prefetch=prefetch, write_every=write_every))
    # registered page-aligned windows of larger allocations: is_pinned() looks at the storage's
    # start, outside the window, so check the engine's record of what it registered
    assert {b.flat.data_ptr() for b in engine.blocks} == {t.data_ptr() for t in engine._pinned}
    a, b = _train(resident, 8), _train(base, 8, engine)
    for x, y in zip(a, b):
        assert (x.losses_plus, x.losses_other, x.projected_grads) == (y.losses_plus, y.losses_other, y.projected_grads)
    with torch.no_grad():
        batch = {k: v.cuda() for k, v in tiny_batch().items()}
        assert torch.equal(resident(**batch).logits, base(**batch).logits)
    assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(resident.state_dict().values(), base.state_dict().values()))
    engine.promote(1)
    c, d = _train(resident, 2), _train(base, 2, engine)
    assert [s.projected_grads for s in c] == [s.projected_grads for s in d]
