"""CUDA graphs of the unit calls (distzo.graphs): the same steps, bit for bit, as without them.

Each run is made twice from the same initial weights, with ``cuda_graphs`` on and off, and
compared exactly: every stream's loss of every step and every weight at the end. The runs
are checked to have replayed graphs (a run that silently stayed eager would pass otherwise).
The CPU tests at the end check what needs no GPU: the refusals and the padding to a width.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

from distzo import algorithms
from distzo.config import OptimConfig, TrainConfig
from distzo.models import LoraSettings, apply_lora
from distzo.offload import OffloadConfig
from distzo.optimizer import ZOOptimizer
from distzo.tasks.base import TaskConfig
from distzo.tasks.collate import widen

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 20


def _batches(steps: int, rows: int = 4, seqs=(9,)) -> list[dict[str, torch.Tensor]]:
    """A fixed stream of batches; several lengths in turn when ``seqs`` has several."""
    return [{k: v.cuda() for k, v in tiny_batch(rows, seqs[t % len(seqs)], seed=t).items()} for t in range(steps)]


def _run(model, batches, graphs: bool, algorithm="mezo", perturbation="gaussian", batch_streams=False, **settings):
    model = copy.deepcopy(model)
    algo = algorithms.make(algorithm, lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3, **settings)
    opt = ZOOptimizer(model, algorithm=algo, perturbation=perturbation, cuda_graphs=graphs,
                      batch_streams=batch_streams)
    assert bool(opt._stream.batched) == batch_streams
    losses = [opt.step(b).losses for b in batches]
    opt.flush()
    torch.cuda.synchronize()
    replays = 0
    if graphs:
        failed = [key[0] for key, capture in opt._stream.graphs.captures.items() if capture is None]
        assert not failed, f"captures failed for units {failed}"
        replays = opt._stream.graphs.replays
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, replays


def _same(model, batches, algorithm="mezo", **settings) -> None:
    eager_losses, eager_weights, _ = _run(model, batches, False, algorithm, **dict(settings))
    graph_losses, graph_weights, replays = _run(model, batches, True, algorithm, **dict(settings))
    assert replays > 0, "no unit call was replayed from a graph"
    assert graph_losses == eager_losses
    moved = 0
    for name, w in eager_weights.items():
        assert torch.equal(graph_weights[name], w), name
        moved += not torch.equal(w, dict(model.named_parameters())[name].detach())
    assert moved > 0  # the runs trained something


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_steps_equal_eager_steps(family, dtype):
    _same(tiny_model(family, dtype=dtype).cuda(), _batches(STEPS))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_graph_steps_equal_eager_steps(dtype):
    model = apply_lora(tiny_model("llama", dtype=dtype), LoraSettings(r=2, alpha=4)).cuda()
    with torch.no_grad():  # B starts at zero: give the adapters something to perturb from
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    _same(model, _batches(STEPS))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("algorithm,settings", [("mezo", {}), ("fzoo", {"probes": 4, "perturbation": "rademacher"})])
def test_batched_stream_graph_steps_equal_eager_steps(lora, algorithm, settings):
    # optim.batch_streams: the block runs once over every stream's rows, its perturbed layers per stream
    model = tiny_model("opt", dtype=torch.bfloat16)
    if lora:
        model = apply_lora(model, LoraSettings(r=2, alpha=4))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.1)
    _same(model.cuda(), _batches(STEPS), algorithm, batch_streams=True, **settings)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("algorithm,settings", [
    ("fzoo", {"probes": 4, "perturbation": "rademacher"}),
    ("momentum", {"history": 4}),
    ("momentum", {"history": 4, "rule": "adam"}),
    ("mezo", {"directions": 2}),
    ("sparse", {"sparsity": 0.5}),
])
def test_algorithms_graph_steps_equal_eager_steps(algorithm, settings):
    _same(tiny_model("llama", dtype=torch.bfloat16).cuda(), _batches(STEPS), algorithm, **settings)


@cuda
@pytest.mark.gpu
def test_several_widths_each_get_their_graphs():
    model = tiny_model("llama").cuda()
    _same(model, _batches(STEPS, seqs=(7, 12, 16)))


# ------------------------------------------------------------------ no GPU needed


def test_graphs_need_the_fused_kernels():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        ZOOptimizer(tiny_model("llama"), cuda_graphs=True)


def test_graphs_and_offload_are_refused_in_the_config():
    with pytest.raises(ValueError, match="cuda_graphs does not combine with offload"):
        TrainConfig(optim=OptimConfig(cuda_graphs=True), offload=OffloadConfig("cpu"))


def test_graphs_and_first_order_are_refused_in_the_config():
    with pytest.raises(ValueError, match="cuda_graphs does not combine with optim.first_order"):
        TrainConfig(optim=OptimConfig(cuda_graphs=True, first_order=["lm_head.*"]))


def test_widen_pads_masked_unlabelled_columns_on_the_side_given():
    batch = tiny_batch(3, 5)
    batch["position_ids"] = torch.arange(5).expand(3, 5)
    right = widen(batch, 8, pad=0, side="right")
    assert right["input_ids"].shape == (3, 8)
    assert torch.equal(right["input_ids"][:, :5], batch["input_ids"])
    assert (right["attention_mask"][:, 5:] == 0).all() and (right["labels"][:, 5:] == -100).all()
    left = widen(batch, 4, pad=7, side="left")
    assert left["input_ids"].shape == (3, 8)
    assert (left["input_ids"][:, :3] == 7).all() and (left["position_ids"][:, :3] == 0).all()
    assert torch.equal(left["labels"][:, 3:], batch["labels"])
    assert widen(batch, 1, pad=0, side="right") is batch


def test_pad_to_multiple_of_must_be_positive():
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        TaskConfig(pad_to_multiple_of=0)
