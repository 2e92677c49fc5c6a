"""Distributed ZO on CPU (gloo): every mode reproduces the single-process reference.

Ranks are real processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
... in the environment), or by torchrun itself; each runs this file as a script (see
``worker`` at the bottom). Optimizer-level modes run in float64 with MeZO's loss in float64
and the models' RMSNorms in float64 too (tiny_models.float64_throughout), so they match the
four-pass reference as tightly as the single-process engine does (tests/test_optimizer.py),
on any machine. Runs of the real entry point train in float32, where a shard's
loss and a one-half forward round differently from the global stacked forward: they
match to float32 precision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
LR, EPS, WD, STEPS = 1e-3, 1e-3, 0.1, 3


class Mode(NamedTuple):
    """A distributed mode of the tables below: its mesh, its directions and the model it runs."""

    name: str  # "algorithm:mode" for an algorithm other than ZO-SGD
    pert: int
    dir: int
    data: int
    q: int
    estimator: str
    size: str  # "tiny" (float64 Llama) or "larger"


# Modes per world size
MODES = {
    2: [
        Mode("data2", 1, 1, 2, 1, "two-sided", "tiny"),
        Mode("pert2", 2, 1, 1, 1, "two-sided", "tiny"),
        Mode("pert2-one-sided", 2, 1, 1, 1, "one-sided", "tiny"),
        Mode("dir2-q3", 1, 2, 1, 3, "two-sided", "tiny"),
        Mode("data2-larger", 1, 1, 2, 1, "two-sided", "larger"),
    ],
    4: [
        Mode("pert2xdata2", 2, 1, 2, 1, "two-sided", "tiny"),
        Mode("dir2xdata2-q2", 1, 2, 2, 2, "two-sided", "tiny"),
        Mode("pert2xdir2-q2", 2, 2, 1, 2, "two-sided", "tiny"),
        Mode("data4", 1, 1, 4, 1, "two-sided", "tiny"),
    ],
}
# Sliced offload (one host copy per node, each rank uploads 1/P of a block): the same modes.
OFFLOAD_MODES = {
    2: [Mode("offload-data2", 1, 1, 2, 1, "two-sided", "larger"),
        Mode("offload-pert2", 2, 1, 1, 1, "two-sided", "larger"),
        Mode("offload-pert2-deferred", 2, 1, 1, 1, "two-sided", "larger")],
    4: [Mode("offload-pert2xdata2", 2, 1, 2, 1, "two-sided", "larger"),
        Mode("offload-dir2xdata2-q2", 1, 2, 2, 2, "two-sided", "larger"),
        # "-late": every gather of a block's slices lands only when the engine waits for it
        Mode("offload-dir2xdata2-q2-late", 1, 2, 2, 2, "two-sided", "larger")],
}
# Ranks and reference on ATen's portable (non-SIMD) kernels: other bits than the machine's own.
PORTABLE_MODES = {
    4: [Mode("dir2xdata2-q2-larger", 1, 2, 2, 2, "two-sided", "larger"),
        Mode("offload-pert2xdata2", 2, 1, 2, 1, "two-sided", "larger"),
        Mode("offload-dir2xdata2-q2", 1, 2, 2, 2, "two-sided", "larger")],
}
# The other algorithms on the same axes, named "algorithm:mode": FZOO's one forward of N + 1 = 4
# probes (split over pert ranks; a second dir rank has no forward to measure), momentum's
# records of the last steps' seeds, and sparse's masks (thresholds from each rank's own weights,
# also in sliced offload, where only the node's first rank loaded them).
ALGORITHM_MODES = {
    2: [Mode("fzoo:pert2", 2, 1, 1, 1, "one-sided", "tiny"), Mode("momentum:dir2-q3", 1, 2, 1, 3, "two-sided", "tiny"),
        Mode("fzoo:offload-data2", 1, 1, 2, 1, "one-sided", "larger"),
        Mode("sparse:offload-pert2", 2, 1, 1, 1, "two-sided", "larger")],
    4: [Mode("fzoo:pert2xdir2", 2, 2, 1, 1, "one-sided", "tiny"),
        Mode("momentum:pert2xdata2", 2, 1, 2, 1, "two-sided", "tiny"),
        Mode("fzoo:pert2xdata2", 2, 1, 2, 1, "one-sided", "tiny"),
        Mode("momentum:offload-dir2xdata2-q2", 1, 2, 2, 2, "two-sided", "larger"),
        Mode("sparse:pert2xdir2-q2", 2, 2, 1, 2, "two-sided", "tiny"),
        Mode("momentum-adam:dir2xdata2-q2", 1, 2, 2, 2, "two-sided", "tiny")],
}
TABLES = {"modes": MODES, "offload-modes": OFFLOAD_MODES, "portable-kernels": PORTABLE_MODES,
          "algorithm-modes": ALGORITHM_MODES}
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv", "barrier")


@pytest.fixture(autouse=True)
def one_thread():
    """This process computes references while ranks run beside it: one thread each, no
    contention for the cores (two threads made a tiny matmul 1000x slower on 2 cores), and
    the same split of every kernel on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- launching ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    # One thread per rank: up to four ranks share the machine's cores, and every machine splits
    # a rank's kernels alike (a reduction split over threads adds in another order).
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in extra.items()}}


def _start_ranks(world: int, argv: list[str], script: Path = HERE, **env) -> list[subprocess.Popen]:
    """``world`` processes running ``script`` (this file) with torchrun's environment variables (and ``env``)."""
    port = _free_port()
    return [
        subprocess.Popen([sys.executable, str(script), *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE,
                         env=_env(**env, RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in range(world)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout, stderr))
    return out


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), text=True, capture_output=True, timeout=timeout)


# ---------------------------------------------------------------- optimizer-level modes


def _model(size: str):
    from tiny_models import float64_throughout, tiny_model

    if size == "tiny":
        return tiny_model("llama", dtype=torch.float64)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True)
    return float64_throughout(transformers.LlamaForCausalLM(cfg).to(torch.float64).eval())


def _algorithm(mode):
    """The mode's algorithm (MeZO's ZO-SGD unless the name says "algorithm:mode")."""
    from distzo.algorithms.fzoo import FZOO
    from distzo.algorithms.mezo import MeZO
    from distzo.algorithms.momentum import Momentum
    from distzo.algorithms.sparse import SparseMeZO

    name, q, est = mode.name, mode.q, mode.estimator
    algorithm = name.partition(":")[0] if ":" in name else "mezo"
    if algorithm == "fzoo":
        return FZOO(lr=LR, eps=EPS, weight_decay=WD, probes=3)
    if algorithm.startswith("momentum"):  # momentum-adam: the Adam-like rule
        rule = "adam" if algorithm.endswith("-adam") else "heavy-ball"
        return Momentum(beta=0.8, history=2, rule=rule, lr=LR, eps=EPS, weight_decay=WD, directions=q, estimator=est)
    if algorithm == "sparse":
        return SparseMeZO(sparsity=0.5, lr=LR, eps=EPS, weight_decay=WD, directions=q, estimator=est)
    return MeZO(lr=LR, eps=EPS, weight_decay=WD, directions=q, estimator=est)


def _batch(t: int):
    from tiny_models import tiny_batch

    # Four rows, the last right-padded: data shards hold different numbers of label tokens.
    return tiny_batch(rows=4, seq=7, seed=t)


def _run_table(out: Path, command: str, **env) -> dict[str, list[dict]]:
    """Every mode of the table ``command`` run by its ranks: {mode name: [rank 0's record, rank 1's, ...]}."""
    table = TABLES[command]
    for world in table:
        results = _finish(_start_ranks(world, [command, str(out), str(world)], **env))
        for code, _, err in results:
            assert code == 0, err[-3000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(world)]
            for world, modes in table.items() for name, *_ in modes}


@pytest.fixture(scope="module")
def mode_results(tmp_path_factory) -> dict[str, list[dict]]:
    return _run_table(tmp_path_factory.mktemp("modes"), "modes")


def _reference(mode) -> dict:
    """The same steps in one process: MeZO's four-pass reference (two-sided ZO-SGD) or the
    single-process engine (one-sided, which the reference does not implement, and the other
    algorithms, whose engine runs meet their own references in tests/test_algorithm_runs.py)."""
    from reference_mezo import mezo_step

    from distzo.optimizer import ZOOptimizer, causal_lm_loss

    name, q, est = mode.name, mode.q, mode.estimator
    model = _model(mode.size)
    opt = ZOOptimizer(model, algorithm=_algorithm(mode))
    losses, grads = [], []
    for t in range(STEPS):
        if est == "two-sided" and ":" not in name:
            p, o, g = mezo_step(model, _batch(t), t, lr=LR, eps=EPS, weight_decay=WD, q=q, loss_fn=causal_lm_loss)
            losses.append([list(pair) for pair in zip(p, o)])
        else:
            stats = opt.step(_batch(t))
            losses.append(stats.losses)
            g = stats.projected_grads
        grads.append(g)
    opt.flush()
    return {"losses": losses, "grads": grads, "weights": copy.deepcopy(model.state_dict())}


def _assert_matches(rec: dict, ref: dict) -> None:
    """One rank's losses, g's and final weights against the reference's.

    float64 throughout: shard losses combined by label-token weights equal the global mean
    to ~1e-16, so the bounds are those of the single-process engine."""
    for t in range(STEPS):  # every rank ends with every loss and g of every step
        assert [len(f) for f in rec["losses"][t]] == [len(f) for f in ref["losses"][t]]
        for got, want in zip(rec["losses"][t], ref["losses"][t]):
            assert got == pytest.approx(want, abs=1e-11)
        assert rec["grads"][t] == pytest.approx(ref["grads"][t], abs=1e-8)
    assert max(float((rec["weights"][k] - ref["weights"][k]).abs().max()) for k in ref["weights"]) < 1e-12


def _cases(table: dict) -> dict:
    """parametrize's arguments for every (world, mode) of ``table``, named by the modes."""
    cases = [(world, mode) for world, modes in table.items() for mode in modes]
    return {"argvalues": cases, "ids": [mode.name for _, mode in cases]}


@pytest.mark.parametrize("world,mode", **_cases(MODES))
def test_mode_matches_single_process_reference(mode_results, world, mode):
    ranks = mode_results[mode.name]
    assert len(ranks) == world
    ref = _reference(mode)
    for rec in ranks:
        _assert_matches(rec, ref)
    first = ranks[0]["weights"]
    for rec in ranks[1:]:  # no weight ever crosses the network, yet the copies agree bit for bit
        assert all(torch.equal(first[k], rec["weights"][k]) for k in first)
    assert any(not torch.equal(first[k], _model(mode.size).state_dict()[k]) for k in first)  # they did train


@pytest.fixture(scope="module")
def offload_results(tmp_path_factory) -> dict[str, list[dict]]:
    return _run_table(tmp_path_factory.mktemp("offload-modes"), "offload-modes")


@pytest.mark.parametrize("world,mode", **_cases(OFFLOAD_MODES))
def test_sliced_offload_matches_single_process_reference(offload_results, world, mode):
    # Each rank uploads 1/P of every block and writes back only its own slice of the
    # update into the node's one shared host copy. The final weights are read from that
    # copy, so they match the reference only if every rank's slices landed in it.
    ranks = offload_results[mode.name]
    ref = _reference(mode)
    for rec in ranks:
        _assert_matches(rec, ref)
        assert rec["slices"] == world and rec["slots"] == 3  # sliced offload prefetches two blocks by default
        assert rec["uploads"] >= STEPS * 4  # four blocks a step at least
        assert rec["bytes_up"] == rec["uploads"] * rec["block_bytes"] // world  # 1/P of each block per rank
        assert rec["dist_calls"]["all_gather_into_tensor"] == rec["uploads"]


@pytest.fixture(scope="module")
def portable_results(tmp_path_factory) -> dict[str, list[dict]]:
    return _run_table(tmp_path_factory.mktemp("portable-kernels"), "portable-kernels", **PORTABLE_KERNELS)


@pytest.mark.parametrize("world,mode", **_cases(PORTABLE_MODES))
def test_float64_modes_match_on_portable_kernels(portable_results, world, mode):
    # The machine's own kernels and the portable ones round differently, as two CPUs do.
    # Were there a float32 rounding in the float64 path, some machine's bits would cross it
    # and miss the bounds by ~1e-10; on two kernel sets, the suite meets that on every machine.
    ranks = portable_results[mode.name]
    for rec in ranks:
        _assert_matches(rec, ranks[0]["reference"])  # rank 0's, on the same kernels


@pytest.fixture(scope="module")
def algorithm_results(tmp_path_factory) -> dict[str, list[dict]]:
    return _run_table(tmp_path_factory.mktemp("algorithm-modes"), "algorithm-modes")


@pytest.mark.parametrize("world,mode", **_cases(ALGORITHM_MODES))
def test_algorithm_mode_matches_single_process_run(algorithm_results, world, mode):
    ranks = algorithm_results[mode.name]
    ref = _reference(mode)
    for rec in ranks:
        _assert_matches(rec, ref)
        # one all-reduce a step of (forwards, probes, [loss x weight, weight]) float64
        shape = [len(f) for f in ref["losses"][0]]
        assert rec["mesh_bytes"] == [16 * len(shape) * max(shape)] * STEPS
    first = ranks[0]["weights"]
    assert all(torch.equal(first[k], rec["weights"][k]) for rec in ranks[1:] for k in first)


def test_each_step_sends_only_scalars(mode_results):
    # One all-reduce per step of a (q, 2 halves, [loss x weight, weight]) float64 vector:
    # 32 bytes per direction whatever the model size.
    for world, modes in MODES.items():
        for name, q in ((m.name, m.q) for m in modes):
            for rec in mode_results[name]:
                assert rec["mesh_bytes"] == [32 * q] * STEPS, name
                assert rec["dist_bytes"] == [32 * q] * STEPS, name  # counted at torch.distributed's API
                assert rec["dist_calls"] == {"all_reduce": STEPS}, name
    small, large = mode_results["data2"][0], mode_results["data2-larger"][0]
    assert large["params"] > 4 * small["params"]
    assert large["dist_bytes"] == small["dist_bytes"]


def _run_modes(out: Path, world: int, command: str) -> None:
    from distzo import parallel
    from distzo.offload import OffloadConfig, OffloadEngine
    from distzo.optimizer import ZOOptimizer, causal_lm_loss

    counts = _count_collectives()
    for mode in TABLES[command][world]:
        name, pert, dir_, data, size = mode.name, mode.pert, mode.dir, mode.data, mode.size
        offload = name.partition(":")[2 if ":" in name else 0].startswith("offload-")
        mesh = parallel.init(parallel.ParallelConfig(pert=pert, dir=dir_, data=data, timeout_s=60))
        assert mesh.sizes == {"pert": pert, "dir": dir_, "data": data}
        assert all(torch.distributed.get_world_size(mesh.group(a)) == n for a, n in mesh.sizes.items())
        model = _model(size)
        engine = None
        if offload:
            # "-deferred": each rank writes its slices back with every second update only
            cfg = OffloadConfig("cpu", write_every=2 if name.endswith("-deferred") else 1)
            engine = OffloadEngine(model, "cpu", cfg, slices=parallel.node_slices(mesh))
        opt = ZOOptimizer(model, algorithm=_algorithm(mode), loss_fn=causal_lm_loss, mesh=mesh, offload=engine)
        rec = {"losses": [], "grads": [], "mesh_bytes": [], "dist_bytes": [],
               "params": sum(p.numel() for p in model.parameters())}
        counts.clear()
        with _late_gathers() if name.endswith("-late") else contextlib.nullcontext():
            for t in range(STEPS):
                before, sent = counts.get("bytes", 0), mesh.bytes_sent
                stats = opt.step(parallel.shard_batch(_batch(t), mesh.coord("data"), mesh.size("data")))
                rec["losses"].append(stats.losses)
                rec["grads"].append(stats.projected_grads)
                rec["mesh_bytes"].append(mesh.bytes_sent - sent)
                rec["dist_bytes"].append(counts.get("bytes", 0) - before)
            opt.flush()
        rec["dist_calls"] = {k: v for k, v in counts.items() if k != "bytes"}
        rec["weights"] = {k: v.clone() for k, v in model.state_dict().items()}  # read from the shared host copy
        if engine is not None:
            rec["uploads"], rec["bytes_up"] = engine.uploads, engine.bytes_up
            rec["block_bytes"], rec["slices"], rec["slots"] = engine.block_bytes, engine.slices.size, len(engine.slots)
        if command == "portable-kernels" and mesh.rank == 0:
            rec["reference"] = _reference(mode)  # on this process's kernels
        torch.save(rec, out / f"{name}-rank{mesh.rank}.pt")
    mesh.close()


class _Landing:
    """A gather whose output holds NaN until the first ``wait``, when its data lands."""

    def __init__(self, work, staged: torch.Tensor, output: torch.Tensor):
        self.work, self.staged, self.output = work, staged, output
        output.fill_(float("nan"))

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> bool:
        self.work.wait()
        if self.staged is not None:
            self.output.copy_(self.staged)
            self.staged = None
        return True


@contextlib.contextmanager
def _late_gathers():
    """Every gather into a tensor lands as late as its waiter allows, whatever the machine's
    timing (on an idle CPU gloo has usually finished before the engine looks): a slot read or
    written back before its gather was waited for turns the losses or the host copy into NaN."""
    import torch.distributed as dist

    gather = dist.all_gather_into_tensor

    def late(output, tensor, group=None, async_op=False):
        assert async_op, "the engine waits for its gathers itself"
        staged = torch.empty_like(output)
        # the input is a view of the output (this rank's slice): read it before the NaN
        return _Landing(gather(staged, tensor.clone(), group=group, async_op=True), staged, output)

    dist.all_gather_into_tensor = late
    try:
        yield
    finally:
        dist.all_gather_into_tensor = gather


def _count_collectives() -> dict[str, int]:
    """Wrap torch.distributed's collectives to count calls and tensor bytes."""
    import torch.distributed as dist

    counts: dict[str, int] = {}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            counts["bytes"] = counts.get("bytes", 0) + sum(t.numel() * t.element_size() for t in tensors)
            return fn(*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return counts


def test_shards_recombine_to_the_global_loss():
    # In one process: the weighted shard losses equal the global batch's loss for each
    # batch format (LM rows, candidate rows, single-token candidates), also for uneven shards.
    from distzo import parallel
    from distzo.losses import default_loss

    g = torch.Generator().manual_seed(0)
    lm = _batch(0)
    cand = {"input_ids": torch.randint(1, 50, (7, 5), generator=g),
            "attention_mask": torch.ones(7, 5, dtype=torch.long),
            "num_candidates": torch.tensor([2, 3, 2]), "gold": torch.tensor([1, 0, 1])}
    cand["labels"] = cand["input_ids"].masked_fill(torch.rand(7, 5, generator=g) < 0.4, -100)
    cand["labels"][:, -1] = 7  # every candidate row keeps a label
    single = {"input_ids": torch.randint(1, 50, (5, 4), generator=g),
              "attention_mask": torch.ones(5, 4, dtype=torch.long),
              "candidate_ids": torch.tensor([[3, 4], [3, 4], [5, -1], [3, 4], [6, 7]]),
              "gold": torch.tensor([0, 1, 0, 1, 1]), "num_candidates": torch.tensor([2, 2, 1, 2, 2]),
              "logits_to_keep": 1}
    for batch in (lm, cand, single):
        rows, length = batch["input_ids"].shape
        logits = torch.randn(rows, length, 97, generator=g, dtype=torch.float64)
        whole = float(default_loss(logits, batch))
        for count in (2, 3):
            num, den = 0.0, 0.0
            for i in range(count):
                # a "row" column tells which logits belong to the shard's rows
                shard = parallel.shard_batch({**batch, "row": torch.arange(rows)[:, None]}, i, count)
                part = default_loss(logits[shard.pop("row")[:, 0]], shard)
                w = parallel.loss_weight(shard)
                num, den = num + float(part) * w, den + w
            assert num / den == pytest.approx(whole, rel=1e-6), (sorted(batch), count)
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.shard_batch(lm, 0, 5)


def test_config_checks_the_world_size(monkeypatch):
    from distzo import parallel

    assert parallel.ParallelConfig(pert=2).sizes(8) == {"pert": 2, "dir": 1, "data": 4}
    assert parallel.ParallelConfig(pert=2, dir=2, data=2).sizes(8) == {"pert": 2, "dir": 2, "data": 2}
    with pytest.raises(ValueError, match="does not match the world size 6"):
        parallel.ParallelConfig(pert=2, dir=2).sizes(6)
    with pytest.raises(ValueError, match="does not match the world size 4"):
        parallel.ParallelConfig(data=3).sizes(4)
    with pytest.raises(ValueError, match="pert must be >= 1"):
        parallel.ParallelConfig(pert=0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mesh = parallel.init()  # one process: a trivial mesh and no process group
    assert (mesh.world_size, mesh.sizes, mesh.group("data")) == (1, {"pert": 1, "dir": 1, "data": 1}, None)
    with pytest.raises(ValueError, match="world size 1"):
        parallel.init(parallel.ParallelConfig(pert=2))


def test_a_rank_without_a_gpu_of_its_own_is_one_clear_error(monkeypatch):
    # two ranks started on a one-GPU node: CUDA would say "invalid device ordinal" from inside set_device
    from distzo import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device was reached"))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(parallel.ParallelError, match=r"local rank 1 has no GPU of its own: this node has 1; "
                                                      r"start one process per GPU \(torchrun --nproc-per-node 1\)"):
        parallel.init(parallel.ParallelConfig(pert=2), "auto")


# ---------------------------------------------------------------- the real entry point


def _args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["train", "--lora", "false", "--model", str(model_dir), "--task", "sst2", "--data", str(data_dir),
            "--output-dir", str(out), "--task.num_train", "32", "--task.num_dev", "8", "--task.num_test", "16",
            "--batch-size", "4",
            "--lr", "1e-2", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false", "--zero_shot", "false",
            *extra]


@pytest.fixture(scope="module")
def whole(tiny_model_dir, sst2_dir, tmp_path_factory) -> Path:
    """Six uninterrupted single-process steps: what every distributed run must reproduce."""
    from distzo.cli import main

    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "6")) == 0
    return out


def _records(out: Path) -> list[dict]:
    from distzo.checkpoint import TrajectoryLog

    return TrajectoryLog(out / "trajectory.jsonl").read()


def _assert_same_run(run: Path, reference: Path, steps: int) -> None:
    # float32 training: a shard's (or a half's) forward rounds differently from the stacked
    # global forward by ~1e-7 in the loss; g = dL / 2eps (eps 1e-2) carries that as ~1e-5.
    got, want = _records(run), _records(reference)[:steps]
    assert [r["step"] for r in got] == list(range(steps))
    for a, b in zip(got, want):
        assert a["seeds"] == b["seeds"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grads"] == pytest.approx(b["grads"], abs=1e-3)
    if steps == len(_records(reference)):
        from safetensors.torch import load_file

        x = load_file(run / "checkpoints" / "last" / "model.safetensors")
        y = load_file(reference / "checkpoints" / "last" / "model.safetensors")
        assert x.keys() == y.keys()
        assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-5


def test_resume_at_another_world_size(tiny_model_dir, sst2_dir, whole, tmp_path):
    from distzo.cli import main

    out = tmp_path / "run"
    done = _torchrun("--standalone", "--nproc-per-node", "2", "-m", "distzo.cli",
                     *_args(tiny_model_dir, sst2_dir, out, "--steps", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("3 steps") == 1  # one summary: rank 0's
    assert json.loads((out / "launch.json").read_text())["mesh"] == {"pert": 1, "dir": 1, "data": 2}
    assert main(_args(tiny_model_dir, sst2_dir, out, "--steps", "6", "--resume")) == 0
    _assert_same_run(out, whole, 6)


def _assert_evaluations_of(out: Path, splits: list[str]) -> None:
    """The run's sharded zero-shot and final metrics equal one process scoring the same weights."""
    from distzo.config import run_config
    from distzo.evaluate import evaluate
    from distzo.models import load_model
    from distzo.tasks import get_task, load_task

    cfg = run_config(out)
    rows = {r["split"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "split" in r}
    assert sorted(rows) == sorted(splits) and all(r["eval_seconds"] >= 0 for r in rows.values())
    test = load_task(cfg.task).test
    weights = {"zero_shot": cfg.model.name, "test": out / "checkpoints" / "last"}  # base and final weights
    for split, model_dir in ((s, w) for s, w in weights.items() if s in rows):
        model, tokenizer = load_model(replace(cfg.model, name=str(model_dir), device="cpu"))
        metrics = evaluate(model, tokenizer, get_task(cfg.task.name), test, cfg.eval_batch_size, cfg.task.max_length)
        assert {k: rows[split][k] for k in metrics} == metrics, split


def test_sharded_evaluation_of_the_entry_point(tiny_model_dir, sst2_dir, tmp_path):
    # torchrun, two resident ranks: each scores half of every evaluation, the metrics are the whole split's.
    out = tmp_path / "run"
    done = _torchrun("--standalone", "--nproc-per-node", "2", "-m", "distzo.cli",
                     *_args(tiny_model_dir, sst2_dir, out, "--steps", "2", "--zero_shot", "true",
                            "--eval-batch-size", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_evaluations_of(out, ["zero_shot", "test"])


def test_sliced_offload_run_of_the_entry_point(tiny_model_dir, sst2_dir, whole, tmp_path):
    # torchrun, two ranks, --offload cpu: one host copy in shared memory, evaluated by all
    # ranks together in lockstep (every forward is collective), saved by rank 0.
    out = tmp_path / "run"
    done = _torchrun("--standalone", "--nproc-per-node", "2", "-m", "distzo.cli",
                     *_args(tiny_model_dir, sst2_dir, out, "--steps", "6", "--offload", "cpu", "--eval-every", "3",
                            "--eval-batch-size", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(out, whole, 6)
    _assert_evaluations_of(out, ["dev", "test_at_best_dev", "test"])
    assert not list(Path("/dev/shm").glob("distzo-*"))  # the shared buffers leave nothing behind


def test_two_nodes_on_loopback(tiny_model_dir, sst2_dir, whole, tmp_path):
    out, port = tmp_path / "run", _free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cli = ["-m", "distzo.cli", *_args(tiny_model_dir, sst2_dir, out, "--steps", "4", "--parallel.pert", "2")]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node-rank", str(n), *cli],
                              cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n in (0, 1)]
    for code, _, err in _finish(nodes):
        assert code == 0, err[-3000:]
    _assert_same_run(out, whole, 4)


def _dying(mode: str, at_step: int, cli_args: list[str]) -> list[str]:
    return ["dying", mode, str(at_step), *cli_args]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
ENGINES_AND_FAULTS = [(fault, engine) for engine in ("resident", "sliced") for fault in ("exit", "hang")]


@pytest.mark.parametrize(("fault", "engine"), ENGINES_AND_FAULTS)
def test_dead_or_hung_rank_ends_the_others_with_one_line(tiny_model_dir, sst2_dir, tmp_path, fault, engine):
    # Resident, rank 0 waits in the step's all-reduce; sliced, in the gather of a block's
    # slices (every forward is collective there).
    from transformers import AutoModelForCausalLM

    from distzo.checkpoint import readable_checkpoint

    out, timeout = tmp_path / "run", 15
    args = _args(tiny_model_dir, sst2_dir, out, "--steps", "50", "--save-every", "2",
                 "--parallel.timeout_s", str(timeout), *(["--offload", "cpu"] if engine == "sliced" else []))
    rank0, rank1 = _start_ranks(2, _dying(fault, 3, args))
    _, err0 = rank0.communicate(timeout=120)
    finished = time.time()
    if fault == "hang":
        rank1.kill()
    _, err1 = rank1.communicate(timeout=60)
    assert rank0.returncode == 4, err0[-3000:]
    assert fault == "hang" or rank1.returncode == 17, err1[-3000:]
    # rank 0 waits at most one timeout after reaching step 3 (a few seconds of startup)
    waited = finished - (out / "trajectory.jsonl").stat().st_mtime
    lines = [line for line in err0.splitlines() if line.startswith("distzo:")]
    assert len(lines) == 1 and "rank 0" in lines[0] and "another rank died or did not answer" in lines[0]
    assert waited < timeout + 10
    folder = readable_checkpoint(out / "checkpoints" / "last")  # the last checkpoint is whole
    assert json.loads((folder / "distzo_state.json").read_text())["step"] == 2
    assert [r["step"] for r in _records(out)] == [0, 1, 2]
    AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])  # gloo, NCCL
@pytest.mark.parametrize(("fault", "engine"), ENGINES_AND_FAULTS)
def test_a_lost_peer_fails_the_step_within_the_timeout(fault, engine, device):
    # The optimizer alone (the entry point above needs `datasets`): rank 1 dies or hangs
    # before step 2, rank 0 must leave its step with one ParallelError within the timeout.
    timeout = 10
    rank0, rank1 = _start_ranks(2, ["lost-peer", fault, engine, device, str(timeout)])
    start = time.time()
    _, err0 = rank0.communicate(timeout=120)
    elapsed = time.time() - start
    if fault == "hang":
        rank1.kill()
    _, err1 = rank1.communicate(timeout=60)
    assert rank0.returncode == 4, err0[-3000:]
    assert fault == "hang" or rank1.returncode == 17, err1[-3000:]
    lines = [line for line in err0.splitlines() if line.startswith("lost peer:")]
    assert len(lines) == 1 and "rank 0" in lines[0] and "another rank died or did not answer" in lines[0], err0
    steps_done = int(lines[0].split("after ")[1].split(" steps")[0])
    assert steps_done == 2 and elapsed < timeout + 60  # startup included


def _run_lost_peer(fault: str, engine: str, device: str, timeout: float) -> int:
    from tiny_models import tiny_batch, tiny_model

    from distzo import parallel
    from distzo.offload import OffloadConfig, OffloadEngine
    from distzo.optimizer import ZOOptimizer

    mesh = parallel.init(parallel.ParallelConfig(pert=2, timeout_s=timeout), device)
    model = tiny_model("llama")
    offload = None
    if engine == "sliced":
        offload = OffloadEngine(model, mesh.device, OffloadConfig("cpu"), slices=parallel.node_slices(mesh))
    else:
        model.to(mesh.device)
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-3, mesh=mesh, offload=offload)
    for t in range(4):
        if mesh.rank == 1 and t == 2:
            if fault == "exit":
                os._exit(17)
            time.sleep(3600)
        try:
            opt.step(tiny_batch(seed=t))
        except parallel.ParallelError as exc:
            print(f"lost peer: after {t} steps: {exc}", file=sys.stderr, flush=True)
            os._exit(4)  # a group that lost a peer cannot be torn down in order
    return 0


def test_torchrun_restart_resumes_from_the_last_checkpoint(tiny_model_dir, sst2_dir, whole, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, sst2_dir, out, "--steps", "6", "--save-every", "2", "--parallel.timeout_s", "30")
    done = _torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(HERE),
                     *_dying("exit", 3, args))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchrun restart 1: resuming at step 2" in done.stdout
    _assert_same_run(out, whole, 6)


def _run_dying(mode: str, at_step: int, cli_args: list[str]) -> int:
    """The real CLI, except that rank 1 of the first attempt dies (or hangs) before ``at_step``."""
    from distzo.cli import main
    from distzo.optimizer import ZOOptimizer

    step = ZOOptimizer.step

    def failing(self, batch):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if os.environ["RANK"] == "1" and first_attempt and self.step_count == at_step:
            if mode == "exit":
                os._exit(17)
            time.sleep(3600)
        return step(self, batch)

    ZOOptimizer.step = failing
    return main(cli_args)


def worker(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE.parent))
    if argv[0] in TABLES:
        _run_modes(Path(argv[1]), int(argv[2]), argv[0])
        # The records are on disk and the process group is destroyed: leave without the
        # interpreter's teardown. Once, under a heavily loaded machine, a rank that had written
        # its records aborted there ("terminate called without an active exception", SIGABRT),
        # freeing what was left of the many groups a table's meshes create (pytorch#179291
        # describes gloo threads outliving finalization); what this test checks was already done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if argv[0] == "dying":
        return _run_dying(argv[1], int(argv[2]), argv[3:])
    if argv[0] == "lost-peer":
        return _run_lost_peer(argv[1], argv[2], argv[3], float(argv[4]))
    raise SystemExit(f"unknown worker command {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
