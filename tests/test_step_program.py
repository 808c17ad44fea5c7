"""The sparse step as a fixed program (`step_program`): padded to buckets, it equals the masked-dense
reference; its steps after the first read nothing back to the host; compiled, one program serves
every mask of the same buckets."""

import collections

import pytest
import torch
from test_sparse_edit import EDIT, PROMPT, TOL, masks, max_diff
from torch.utils._python_dispatch import TorchDispatchMode

from fisedit_ray import EditEngine
from fisedit_ray.capture import CaptureConfig
from fisedit_ray.masks import blob_mask
from fisedit_ray.sparse_unet import SparseUNet, bucket_size, halo_bucket_size
from fisedit_ray.step_program import StepProgram

STEPS = 4


def test_bucket_sizes():
    assert [bucket_size(n) for n in (0, 1, 8, 9, 12, 13, 16, 17, 24, 25, 33, 100)] == [
        0, 8, 8, 12, 12, 16, 16, 24, 24, 32, 48, 128,
    ]  # fmt: skip
    for n in range(1, 5000):
        size = bucket_size(n)
        assert n <= size <= max(8, n * 3 // 2 + 1)
        assert bucket_size(size) == size  # a bucket is its own bucket
    assert [halo_bucket_size(n, 16) for n in (0, 1, 16, 17, 33, 64, 65)] == [0, 16, 16, 32, 64, 64, 128]
    assert halo_bucket_size(3, 0) == 8


@pytest.fixture(scope="module")
def padded_engines(sd1_pipe, sd2_pipe):
    """Engines whose sparse passes run padded through the step program, eagerly (no compile)."""
    out = {}
    for name, pipe in (("sd1", sd1_pipe), ("sd2", sd2_pipe)):
        engine = EditEngine.from_pipeline(pipe)
        engine.step_program = StepProgram(engine.sparse_unet, compiled=False)
        out[name] = engine
    return out


@pytest.mark.parametrize("config", ["sd1", "sd2"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("mask_name", ["one_cell", "border", "checkerboard", "blob_2%", "blob_15%"])
def test_padded_program_equals_reference(padded_engines, config, guidance, mask_name):
    engine = padded_engines[config]
    parent = engine.generate(
        PROMPT, seed=1, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent"
    )
    mask = masks(16, 16)[mask_name]
    sparse = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    reference = engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(sparse, reference) <= TOL
    assert torch.equal(sparse.latents[..., ~mask], parent.latents[..., ~mask])
    # the delta keeps the real cells only: its child, edited elsewhere, equals its own reference
    other = blob_mask((16, 16), 0.1, seed=7)
    child = engine.edit(sparse, "a green circle at the top left", mask=other, output_type="latent")
    child_reference = engine.edit(sparse, "a green circle at the top left", mask=other, mode="reference")
    assert max_diff(child, child_reference) <= TOL
    assert [len(c) for c in child.cache.cells] == [len(c) for c in child.pyramid.cells]


def test_padded_program_equals_unpadded_pass_with_compact_caches(sd1_pipe, engine):
    """bf16 and int8 caches: the statistics of what is stored leave the padding out."""
    for cache_dtype in ("bfloat16", "int8"):
        plain = EditEngine.from_pipeline(sd1_pipe, cache_dtype=cache_dtype)
        padded = EditEngine.from_pipeline(sd1_pipe, cache_dtype=cache_dtype)
        padded.step_program = StepProgram(padded.sparse_unet, compiled=False)
        parent = plain.generate(PROMPT, seed=3, num_inference_steps=STEPS, output_type="latent")
        mask = blob_mask((16, 16), 0.08, seed=2)
        a = plain.edit(parent, EDIT, mask=mask, output_type="latent")
        b = padded.edit(parent, EDIT, mask=mask, output_type="latent")
        assert max_diff(a, b) <= TOL
        for step_a, step_b in zip(a.cache.steps, b.cache.steps, strict=True):
            assert step_a.keys() == step_b.keys()
            for key in step_a:  # the same rows, up to a rounding step of the storage dtype
                x, y = step_a[key].double(), step_b[key].double()
                atol = 1.0 if step_a[key].dtype == torch.int8 else 1e-3
                assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-2, atol=atol), key


def test_padded_batch_equals_edits_alone(padded_engines):
    engine = padded_engines["sd1"]
    parent = engine.generate(PROMPT, seed=4, num_inference_steps=STEPS, output_type="latent")
    requests = [(parent, EDIT, blob_mask((16, 16), r, seed=i)) for i, r in enumerate((0.03, 0.1, 0.2))]
    batch = engine.edit_batch(requests, output_type="latent")
    for (p, prompt, mask), result in zip(requests, batch, strict=True):
        alone = engine.edit(p, prompt, mask=mask, output_type="latent")
        assert max_diff(result, alone) <= 2e-6 * alone.latents.abs().max().item()


class _Syncs(TorchDispatchMode):
    """Counts the operations that read a tensor's values back to the host."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = str(func.overloadpacket)
        if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.item"):
            self.counts[name] += 1
        if name in ("aten._to_copy", "aten.copy_"):
            source = args[1] if name == "aten.copy_" else args[0]
            target = (kwargs or {}).get("device") if name == "aten._to_copy" else args[0].device
            if target is not None and source.device.type != "cpu" and torch.device(target).type == "cpu":
                self.counts["device_to_host"] += 1
        return func(*args, **(kwargs or {}))


def test_no_host_reads_after_the_first_step(padded_engines, monkeypatch):
    engine = padded_engines["sd1"]
    parent = engine.generate(PROMPT, seed=5, num_inference_steps=6, output_type="latent")
    program, seen = engine.step_program, []
    run = program.run

    def counted(lanes):
        if not seen:  # the first step prepares the pass: its plans, its reads
            seen.append(None)
            return run(lanes)
        with _Syncs() as syncs:
            outs = run(lanes)
        seen.append(syncs)
        return outs

    monkeypatch.setattr(program, "run", counted)
    engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.1, seed=3), output_type="latent")
    assert len(seen) == 6
    for syncs in seen[1:]:
        assert syncs.ops > 100  # the step ran under the counter
        assert dict(syncs.counts) == {}


def test_a_compiled_program_refuses_packed_weights(sd1_pipe):
    with pytest.raises(ValueError, match="plain weights"):
        StepProgram(SparseUNet(sd1_pipe.unet), compiled=True)
    assert not EditEngine.from_pipeline(sd1_pipe, compile=True).sparse_unet.packed


@pytest.fixture(scope="module")
def compiled_engine(sd1_pipe):
    return EditEngine.from_pipeline(sd1_pipe, compile=True)


def test_compiled_program_equals_reference_and_is_reused(compiled_engine):
    engine = compiled_engine
    parent = engine.generate(PROMPT, seed=6, num_inference_steps=STEPS, output_type="latent")
    first, second = blob_mask((16, 16), 0.05, seed=0), blob_mask((16, 16), 0.05, seed=1)
    assert [bucket_size(len(c)) for c in engine._pyramid(first).cells] == [
        bucket_size(len(c)) for c in engine._pyramid(second).cells
    ]
    assert engine.warm_up([0.05], height=parent.settings.height, width=parent.settings.width) > 0
    assert engine.step_program.programs >= 1 and engine.step_program.compile_seconds > 0
    edit = engine.edit(parent, EDIT, mask=first, output_type="latent")
    assert edit.stats["compile_seconds"] == 0  # the warm-up compiled its buckets
    reference = engine.edit(parent, EDIT, mask=first, mode="reference", output_type="latent")
    assert max_diff(edit, reference) <= TOL
    programs = engine.step_program.programs
    again = engine.edit(parent, EDIT, mask=first, output_type="latent")
    assert again.stats["compile_seconds"] == 0 and engine.step_program.programs == programs
    assert max_diff(again, edit) == 0
    # a chain: an edit of the compiled edit
    child = engine.edit(edit, "a green circle at the top left", mask=second, output_type="latent")
    child_reference = engine.edit(edit, "a green circle at the top left", mask=second, mode="reference")
    assert max_diff(child, child_reference) <= TOL


def test_compiled_automatic_mask_equals_reference(compiled_engine):
    engine, local = compiled_engine, CaptureConfig(global_median=None, grow=1.0)  # as test_capture's
    parent = engine.generate(PROMPT, seed=3, num_inference_steps=STEPS, output_type="latent")
    prompt = PROMPT + " and a blue square at the center"
    edit = engine.edit(parent, prompt, capture=local, output_type="latent")
    assert 0 < edit.stats["mask_ratio"] < 1 and edit.stats["mask_source"] == "capture"
    reference = engine.edit(parent, prompt, capture=local, mode="reference", output_type="latent")
    assert torch.equal(reference.mask, edit.mask)
    assert max_diff(edit, reference) <= TOL
