"""MAML's memory and precision options: chunked vmap, checkpointed inner steps, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.saved_tensors import max_live_saved
from helpers.training import RandomImages

from sharebone.data.episodes import EpisodeSampler
from sharebone.memory import PeakMemory
from sharebone.regimes import ANIL, FOMAML, MAML, MetaSGD
from sharebone.regimes.maml import chunking
from sharebone.regimes.maml import regime as maml_module
from sharebone.regimes.maml.chunking import auto_chunk_size, chunk_slices
from sharebone.regimes.maml.precision import check_autocast, check_bf16_supported
from sharebone.run.environment import set_float32_matmul_precision

PRESETS = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD}
TINY_CONV = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}


def conv_episode(tasks, double=True):
    episode = RandomImages().sampler("train", 3, 2, 2, 0).batch(range(tasks)).to_float()
    if not double:
        return episode
    return type(episode)(episode.support.double(), episode.support_labels,
                         episode.query.double(), episode.query_labels, episode.classes)


def run(name, episode, spec=TINY_CONV, double=True, **options):
    """Meta-training loss, predictions and meta-gradients of one step from the same init."""
    torch.manual_seed(0)
    options.setdefault("inner_steps", 2)
    model = PRESETS[name](spec, n_way=3, inner_lr=0.1, **options)
    if double:
        model.double()
    loss, predictions = model.episode_loss(episode)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return model, loss.detach(), predictions.detach(), grads


def assert_same(a, b, tol=1e-10):
    _, loss_a, pred_a, grads_a = a
    _, loss_b, pred_b, grads_b = b
    torch.testing.assert_close(loss_b, loss_a, rtol=tol, atol=tol)
    torch.testing.assert_close(pred_b, pred_a, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for k, g in grads_a.items():
        assert (g is None) == (grads_b[k] is None), k
        if g is not None:
            torch.testing.assert_close(grads_b[k], g, rtol=tol, atol=tol, msg=k)


# -- chunked vmap ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_chunked_vmap_gives_the_meta_gradient_of_vmap_and_of_the_loop(name):
    """Chunks of 2 and of 3 tasks (a short last chunk) of a meta-batch of 5, and auto."""
    episode = conv_episode(tasks=5)
    loop = run(name, episode, vmap=False)
    vmapped = run(name, episode, vmap=True)
    for chunk in (2, 3, "auto"):
        chunked = run(name, episode, vmap_chunk_size=chunk)
        assert_same(loop, chunked)
        assert_same(vmapped, chunked)
    model = chunked[0].eval()  # evaluation runs in the same chunks
    torch.testing.assert_close(model.predict_episode(episode),
                               vmapped[0].eval().predict_episode(episode),
                               rtol=1e-10, atol=1e-10)


def test_chunks_of_a_meta_batch_short_last_chunk():
    assert [(s.start, s.stop) for s in chunk_slices(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in chunk_slices(8, 4)] == [(0, 4), (4, 8)]
    assert [(s.start, s.stop) for s in chunk_slices(3, 16)] == [(0, 3)]
    with pytest.raises(ValueError, match=">= 1"):
        chunk_slices(4, 0)


def test_the_estimate_of_auto_chunk_size():
    # k = floor(0.8 * free / per task), between 1 and the tasks there are.
    assert auto_chunk_size(10_000, 1_000, 32) == 8
    assert auto_chunk_size(10_000, 1_000, 32, headroom=0.5) == 5
    assert auto_chunk_size(1_000_000, 1_000, 32) == 32
    assert auto_chunk_size(500, 1_000, 32) == 1
    assert auto_chunk_size(-5, 1_000, 32) == 1
    assert auto_chunk_size(10_000, 0, 7) == 7
    with pytest.raises(ValueError):
        auto_chunk_size(10_000, 1_000, 0)


def record_chunks(monkeypatch):
    sizes = []
    vmapped = MAML._vmapped

    def recording(task, episode, chunk):
        sizes.append(chunk.stop - chunk.start)
        return vmapped(task, episode, chunk)

    monkeypatch.setattr(MAML, "_vmapped", staticmethod(recording))
    return sizes


def test_auto_chunk_size_on_cpu_is_the_whole_meta_batch(monkeypatch):
    sizes = record_chunks(monkeypatch)
    model, *_ = run("maml", conv_episode(tasks=5), vmap_chunk_size="auto")
    assert sizes == [5] and model.auto_chunk_size == 5


def test_auto_chunk_size_measures_one_task_then_fills_free_memory(monkeypatch):
    """The CUDA branch with the device's answers faked: a first chunk of one task peaks at
    1000 bytes, 3000 bytes are free, so the other chunks hold floor(0.8 * 3000 / 1000) = 2."""

    class Probe:
        def __init__(self, device):
            self.started = False

        def start(self):
            self.started = True

        def bytes_used(self):
            assert self.started
            return 1000

    monkeypatch.setattr(chunking, "free_device_bytes", lambda device: 3000)
    monkeypatch.setattr(maml_module, "PeakMemory", Probe)
    sizes = record_chunks(monkeypatch)
    episode = conv_episode(tasks=6)
    model, *result = run("maml", episode, vmap_chunk_size="auto")
    assert sizes == [1, 2, 2, 1] and model.auto_chunk_size == 2
    sizes.clear()
    model.episode_loss(episode)  # the next meta-batch of this shape: measured already
    assert sizes == [2, 2, 2]
    monkeypatch.undo()
    assert_same(run("maml", episode, vmap=True), (model, *result))


def test_each_chunk_graph_is_freed_before_the_next_chunk_runs(monkeypatch):
    """Chunked meta-training takes a chunk's meta-gradient (freeing its graph) before building
    the next chunk: memory holds one chunk's graph. (Saved-tensor hooks cannot count this here:
    torch.func.grad refuses them.)"""
    outputs, freed = [], []
    vmapped = MAML._vmapped

    def recording(task, episode, chunk):
        if outputs:
            try:
                torch.autograd.grad(outputs[-1].sum(), list(model.parameters()),
                                    allow_unused=True)
                freed.append(False)
            except RuntimeError as error:
                freed.append("second time" in str(error))
        outputs.append(vmapped(task, episode, chunk))
        return outputs[-1]

    monkeypatch.setattr(MAML, "_vmapped", staticmethod(recording))
    torch.manual_seed(0)
    model = MAML(TINY_CONV, n_way=3, inner_lr=0.1, vmap_chunk_size=2)
    model.episode_loss(conv_episode(tasks=6, double=False))
    assert freed == [True, True]


@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_a_vmapped_task_holds_about_the_memory_of_a_looped_one(name):
    """Peak memory of a meta-training step (PeakMemory: the allocations themselves, as a GPU
    counts them): vmapped tasks hold their graphs at once, so a chunk of 4 costs 4 tasks, but
    each about what a looped task costs with the fused batch-norm kernel. The plain-op batch
    norm torch.func needs kept three activation-sized tensors per layer (x, x - mean and the
    normalised x): 1.87x the loop's per task here; as x * scale + shift it keeps x: 1.24x."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 16, 16), generator=g, dtype=torch.uint8)
    episode = EpisodeSampler(images, torch.arange(60) // 6, 5, 1, 5).batch(range(4)).to_float()
    spec = {**TINY_CONV, "hidden": 8}

    def peak_bytes(**options):
        torch.manual_seed(0)
        model = PRESETS[name](spec, n_way=5, inner_lr=0.1, **options)
        model.episode_loss(episode)[0].backward()  # once first: one-time allocations
        with PeakMemory() as peak:
            model.episode_loss(episode)[0].backward()
        return peak.bytes

    looped = peak_bytes(vmap=False)
    assert peak_bytes(vmap_chunk_size=4) <= 1.4 * 4 * looped


# -- checkpointed inner steps -------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)  # fomaml: first order, the others second order
def test_checkpointed_inner_steps_give_the_same_meta_gradient(name):
    episode = conv_episode(tasks=2)
    for per_task in (True, False):
        plain = run(name, episode, vmap=False, per_task_backward=per_task, inner_steps=3)
        checkpointed = run(name, episode, vmap=False, per_task_backward=per_task,
                           inner_steps=3, checkpoint_inner_steps=True)
        assert_same(plain, checkpointed)


@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_checkpointed_inner_steps_keep_no_activations_per_step(name):
    """Bytes autograd holds at once, at 1 and at 4 inner steps: checkpointed, each extra step
    keeps only its input parameters (one set of adapted parameters); plain, it keeps its
    support pass's activations and their gradient's graph as well."""
    def saved_bytes(steps, checkpoint):
        torch.manual_seed(0)
        model = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1, inner_steps=steps,
                              vmap=False, checkpoint_inner_steps=checkpoint)
        adapted = sum(torch.Size(s).numel() * 4 for s in model.adapted_shapes().values())
        _, nbytes, (loss, _) = max_live_saved(
            lambda: model.episode_loss(conv_episode(1, double=False)))
        loss.backward()
        return nbytes, adapted

    one, adapted = saved_bytes(1, True)
    four, _ = saved_bytes(4, True)
    assert four - one <= 3 * adapted, "checkpointed steps should keep parameters only"
    plain_one, _ = saved_bytes(1, False)
    plain_four, _ = saved_bytes(4, False)
    assert plain_four - plain_one > 3 * (four - one) + 3 * adapted


# -- mixed precision ----------------------------------------------------------------------------
def separable_episode(tasks=8):
    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(20, 32, generator=g)
    x = centers.repeat_interleave(10, 0) + torch.randn(200, 32, generator=g)
    return EpisodeSampler(x, torch.arange(200) // 10, 5, 2, 5).batch(range(tasks))


@pytest.mark.parametrize("options", [{"vmap": False}, {"vmap_chunk_size": 3},
                                     {"vmap": False, "checkpoint_inner_steps": True}],
                         ids=["loop", "chunked-vmap", "checkpointed"])
@pytest.mark.parametrize("name", PRESETS)
def test_bf16_meta_gradient_is_close_to_float32(name, options):
    """bf16 autocast (what trainer.precision=bf16-mixed runs training_step under) against
    float32 on a 2-hidden-layer MLP, 5-way 2-shot, meta-batch 8, 2 inner steps: cosine
    similarity > 0.99 and relative norm error < 5e-2 (measured: 0.999+, 1.6-4.2e-2).
    Parameters, the adapted parameters and the meta-gradients stay float32."""
    spec = {"name": "mlp", "in_features": 32, "hidden": [64, 64]}
    episode = separable_episode()
    grads = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = PRESETS[name](spec, n_way=5, inner_lr=0.4, inner_steps=2, **options)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.episode_loss(episode)
            task = episode.task(0)
            adapted, _ = model.adapt_task(task.support, task.support_labels, 5, 2, False)
        assert loss.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in adapted.values())
        loss.backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    full, half = grads
    assert F.cosine_similarity(full, half, dim=0) > 0.99
    assert (half - full).norm() / full.norm() < 5e-2


def test_float16_autocast_is_refused_by_the_inner_loop():
    model = MAML({"name": "mlp", "in_features": 32, "hidden": [8]}, n_way=5)
    episode = separable_episode(tasks=2)
    for training in (True, False):
        model.train(training)
        with torch.autocast("cpu", dtype=torch.float16), \
                pytest.raises(RuntimeError, match="16-mixed.*bf16-mixed"):
            model.episode_loss(episode)
    check_autocast("cpu")  # no autocast: nothing to refuse
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_autocast("cpu")


def test_bf16_on_a_gpu_without_bf16_is_refused():
    with pytest.raises(RuntimeError, match="bf16-mixed needs bfloat16.*32-true"):
        check_bf16_supported("bf16-mixed", torch.device("cuda"), supported=False)
    check_bf16_supported("bf16-mixed", torch.device("cuda"), supported=True)
    check_bf16_supported("bf16-mixed", torch.device("cpu"))  # CPUs run bf16 autocast
    check_bf16_supported("32-true", torch.device("cuda"), supported=False)


def test_float32_matmul_precision_key():
    before = torch.get_float32_matmul_precision()
    try:
        assert set_float32_matmul_precision("auto", cuda=False) is None
        assert torch.get_float32_matmul_precision() == before  # the CPU left untouched
        assert set_float32_matmul_precision(None) is None
        assert set_float32_matmul_precision("auto", cuda=True) == "high"
        assert torch.get_float32_matmul_precision() == "high"
        assert set_float32_matmul_precision("medium") == "medium"
        with pytest.raises(ValueError, match="float32_matmul_precision must be"):
            set_float32_matmul_precision("tf32")
    finally:
        torch.set_float32_matmul_precision(before)


def test_lightning_bf16_mixed_meta_trains_through_the_inner_loop(tmp_path):
    import pytorch_lightning as pl

    from sharebone.data.datamodule import EpisodicDataModule

    setting = {"n_way": 3, "k_shot": 1, "q_query": 2}
    data = EpisodicDataModule(RandomImages(), setting, setting, meta_batch_size=2,
                              batches_per_epoch=2, val_episodes=2)
    torch.manual_seed(0)
    model = MAML(TINY_CONV, n_way=3, inner_lr=0.1, vmap_chunk_size=1)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, logger=False, precision="bf16-mixed",
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, accelerator="cpu",
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"vmap_chunk_size": 0}, "vmap_chunk_size must be an integer >= 1"),
    ({"vmap_chunk_size": "4"}, "vmap_chunk_size must be an integer >= 1"),
    ({"vmap_chunk_size": True}, "vmap_chunk_size must be an integer >= 1"),
    ({"vmap_chunk_size": 4, "vmap": False}, "vmap_chunk_size=4 .* vmap=False"),
    ({"vmap_chunk_size": 4, "batch_norm": "per_step"},
     "vmap_chunk_size=4 .* batch_norm='per_step'"),
    ({"vmap_chunk_size": "auto", "per_task_backward": True},
     "vmap_chunk_size='auto' .* per_task_backward=True"),
    ({"vmap_chunk_size": 4, "compile": True}, "vmap_chunk_size=4 .* compile=True"),
    ({"vmap_chunk_size": 4, "checkpoint_inner_steps": True},
     "vmap_chunk_size=4 .* checkpoint_inner_steps=True"),
    ({"checkpoint_inner_steps": True, "vmap": True}, "checkpoint_inner_steps=True .* vmap=True"),
    ({"checkpoint_inner_steps": True, "compile": True},
     "checkpoint_inner_steps=True .* compile=True"),
    ({"checkpoint_inner_steps": True, "batch_norm": "per_step", "vmap": False},
     "checkpoint_inner_steps=True .* batch_norm='per_step'"),
])
def test_memory_options_refuse_what_they_cannot_serve(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAML(TINY_CONV, n_way=3, **kwargs)


def test_chunking_turns_vmap_on_and_checkpointing_keeps_the_loop():
    assert MAML(TINY_CONV, n_way=3, vmap_chunk_size=2).options.uses_vmap("cpu")
    assert not MAML(TINY_CONV, n_way=3, checkpoint_inner_steps=True).options.uses_vmap("cuda")
    assert MAML(TINY_CONV, n_way=3).options.uses_vmap("cuda")
