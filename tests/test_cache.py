"""The activation cache: exact persistence, exact byte accounting, storage dtypes, deltas."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fisedit_ray import EditEngine
from fisedit_ray.cache import ActivationCache, CacheRecorder
from fisedit_ray.masks import blob_mask
from fisedit_ray.unet_layout import level_sizes, tokens

PROMPT = "a red circle at the top left"
EDIT = "a blue square at the center"


@pytest.fixture(scope="module")
def parent(engine):
    return engine.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")


def stored_bytes(folder):
    return sum(t.nbytes for f in folder.glob("*.safetensors") for t in load_file(f).values())


def assert_same_tensors(a: ActivationCache, b: ActivationCache):
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key].cpu(), tb[key].cpu()), key


def test_save_load_round_trip_is_exact(engine, parent, tmp_path):
    edit = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
    parent.cache.save(tmp_path / "parent")
    edit.cache.save(tmp_path / "edit")
    loaded_parent = ActivationCache.load(tmp_path / "parent")
    loaded_edit = ActivationCache.load(tmp_path / "edit", parent=loaded_parent)
    assert_same_tensors(parent.cache, loaded_parent)
    assert_same_tensors(edit.cache, loaded_edit)
    assert loaded_edit.kinds == edit.cache.kinds and loaded_edit.levels == edit.cache.levels
    # an edit computed from the loaded caches is the same edit
    mask = blob_mask((16, 16), 0.2, seed=2)
    from_memory = engine.edit(edit, "a cat", mask=mask, output_type="latent")
    edit.cache = loaded_edit
    from_disk = engine.edit(edit, "a cat", mask=mask, output_type="latent")
    assert torch.equal(from_memory.latents, from_disk.latents)


def test_a_batched_edits_cache_saves_and_loads_exactly(engine, parent, tmp_path):
    """A batch records each edit's rows out of tensors shared by the batch: saved alone, exactly."""
    edits = engine.edit_batch([(parent, EDIT, blob_mask((16, 16), 0.1, seed=s)) for s in range(3)])
    parent.cache.save(tmp_path / "parent")
    edits[1].cache.save(tmp_path / "edit")
    loaded = ActivationCache.load(tmp_path / "edit", parent=ActivationCache.load(tmp_path / "parent"))
    assert_same_tensors(edits[1].cache, loaded)


def test_arrays_round_trip_is_exact(engine, parent):
    edit = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
    loaded_parent = ActivationCache.from_arrays(parent.cache.to_arrays())
    loaded_edit = ActivationCache.from_arrays(edit.cache.to_arrays(), parent=loaded_parent)
    assert_same_tensors(parent.cache, loaded_parent)
    assert_same_tensors(edit.cache, loaded_edit)
    assert (loaded_edit.kinds, loaded_edit.skips) == (edit.cache.kinds, edit.cache.skips)
    with pytest.raises(ValueError, match="needs its parent's cache"):
        ActivationCache.from_arrays(edit.cache.to_arrays())
    with pytest.raises(ValueError, match="cannot read the activation cache"):
        ActivationCache.from_arrays({"meta": {}, "index": {"a": "garbage"}, "data": np.zeros(8, np.uint8)})
    with pytest.raises(ValueError, match="cannot read the activation cache"):
        ActivationCache.from_arrays({"meta": {}, "index": {}, "data": np.zeros(8, np.uint8)})
    payload = edit.cache.to_arrays()
    payload["data"] = payload["data"][:-4096]  # truncated
    with pytest.raises(ValueError, match="past the end of the data"):
        ActivationCache.from_arrays(payload, parent=loaded_parent)


def test_byte_count_equals_stored_tensors(engine, parent, tmp_path):
    edit = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
    for name, version in (("parent", parent), ("edit", edit)):
        version.cache.save(tmp_path / name)
        stats = version.stats["cache_bytes"]
        assert stats["total"] == stored_bytes(tmp_path / name)
        assert stats["total"] == sum(t.nbytes for t in version.cache.tensors().values())
        assert stats["total"] == sum(stats["per_kind"].values())
        assert len(stats["per_step"]) == version.cache.num_steps
    assert {"norm_input", "attn_key", "attn_value", "down_input", "up_input", "group_stats"} <= set(
        parent.stats["cache_bytes"]["per_kind"]
    )
    # a delta stores about the mask's share of its parent
    assert edit.stats["cache_bytes"]["total"] < 0.5 * parent.stats["cache_bytes"]["total"]


def test_delta_materialises_to_the_reference_cache(engine, parent):
    mask = blob_mask((16, 16), 0.2, seed=4)
    sparse = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    reference = engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    for step in range(sparse.cache.num_steps):
        a, b = sparse.cache.reader(step), reference.cache.reader(step)
        for key, kind in parent.cache.kinds.items():
            if kind == "norm_cell_sums":  # sums of squares: large values, compare relatively
                torch.testing.assert_close(a.full(key), b.full(key), rtol=1e-5, atol=1e-4, msg=key)
            else:
                assert (a.full(key) - b.full(key)).abs().max() <= 1e-4, key
            if kind in ("norm_input", "norm_cell_sums"):
                assert torch.allclose(a.stats(key), b.stats(key), rtol=1e-6, atol=1e-3), key


def test_full_map_head_major_in_a_kept_buffer(engine, parent):
    """`full(key, scratch, heads)`: the same map as `full(key)`, each head's rows contiguous, and
    refilled in the caller's buffer at the next call whatever the caller wrote into it."""
    edit = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.2, seed=4), output_type="latent")
    keys = [key for key, kind in parent.cache.kinds.items() if kind in ("attn_key", "attn_value")]
    for version in (parent, edit):  # a root and a delta
        reader, scratch = version.cache.reader(1), {}
        for key in keys:
            expected = reader.full(key).unflatten(-1, (2, -1))
            got = reader.full(key, scratch, heads=2)
            assert torch.equal(got, expected) and got.transpose(1, 2).is_contiguous(), key
            got.fill_(7.0)
            again = reader.full(key, scratch, heads=2)
            assert torch.equal(again, expected) and again.data_ptr() == got.data_ptr(), key


@pytest.mark.parametrize(
    "dtype, bytes_per_value, tol",  # max |latent difference| to the float32 reference, 3 steps
    [(torch.bfloat16, 2, 0.1), (torch.float16, 2, 0.02), (torch.int8, 1, 0.15)],
)
def test_compact_storage_formats(sd1_pipe, dtype, bytes_per_value, tol):
    fp32 = EditEngine.from_pipeline(sd1_pipe)
    compact = EditEngine.from_pipeline(sd1_pipe, cache_dtype=dtype)
    a = fp32.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")
    b = compact.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")
    assert torch.equal(a.latents, b.latents)  # recording in any format leaves generation unchanged
    stats_a, stats_b = a.stats["cache_bytes"], b.stats["cache_bytes"]
    assert stats_b["storage_dtype"] == str(dtype).removeprefix("torch.")
    for kind in ("attn_key", "attn_value"):
        levels = [a.cache.levels[key] for key, k in a.cache.kinds.items() if k == kind]
        cells = sum(a.cache.sizes[lv][0] * a.cache.sizes[lv][1] for lv in levels)
        scales = cells * 2 * 2 * 3 if dtype == torch.int8 else 0  # float16, batch 2, 3 steps
        assert stats_b["per_kind"][kind] == stats_a["per_kind"][kind] * bytes_per_value // 4 + scales
    mask = blob_mask((16, 16), 0.15, seed=6)
    reference = fp32.edit(a, EDIT, mask=mask, mode="reference", output_type="latent")
    sparse = compact.edit(b, EDIT, mask=mask, output_type="latent")
    assert (sparse.latents - reference.latents).abs().max() <= tol
    assert torch.equal(sparse.latents[..., ~mask], a.latents[..., ~mask])
    # the object store's form keeps every storage dtype (bfloat16 travels as bits)
    loaded = ActivationCache.from_arrays(b.cache.to_arrays())
    assert_same_tensors(b.cache, loaded)
    assert_same_tensors(sparse.cache, ActivationCache.from_arrays(sparse.cache.to_arrays(), parent=loaded))


def test_int8_cells_are_quantised_alone(engine, parent):
    """A cell's stored value depends on that cell only: a delta's rows are its full map's rows."""
    cache = ActivationCache(torch.int8, parent.cache.sizes)
    values = torch.randn(2, 16 * 16, 8) * torch.linspace(0.01, 100, 256)[None, :, None]
    full, part = {}, {}
    rows = torch.tensor([3, 17, 200])
    cache.put(full, "k", values)
    cache.put(part, "k", values, rows)
    assert full["k"].dtype == torch.int8 and full["k:scale"].dtype == torch.float16
    for name in ("k", "k:scale"):
        assert torch.equal(full[name][:, rows], part[name])
    decoded = cache.decode(full["k"], full["k:scale"])
    step = full["k:scale"].float()  # per-cell absmax / 127: the error is at most half a step
    assert ((decoded - values).abs() <= step / 2 * 1.01).all()


def test_load_errors_are_clear(tmp_path, engine, parent):
    with pytest.raises(ValueError, match="cannot load the activation cache"):
        ActivationCache.load(tmp_path / "missing")
    edit = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
    edit.cache.save(tmp_path / "edit")
    with pytest.raises(ValueError, match="needs its parent's cache"):
        ActivationCache.load(tmp_path / "edit")
    (tmp_path / "edit" / "step0001.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load the activation cache"):
        ActivationCache.load(tmp_path / "edit", parent=parent.cache)


def test_up_block_inputs_keep_h_and_read_their_skip_from_the_down_path(sd1_pipe):
    unet = sd1_pipe.unet
    modules = dict(unet.named_modules())
    cache = ActivationCache(torch.float32, level_sizes(unet, (16, 16)))
    recorder = CacheRecorder(unet, cache)
    seen, handles = {}, []
    for key in cache.skips:
        hook = lambda m, args, key=key: seen.__setitem__(key, tokens(args[0]))  # noqa: E731
        handles.append(modules[key].register_forward_pre_hook(hook))
    recorder.begin_step()
    with torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 10, encoder_hidden_states=torch.randn(2, 77, 32))
    recorder.end_step()
    recorder.remove()
    for h in handles:
        h.remove()
    reader = cache.reader(0)
    assert seen.keys() == cache.skips.keys() and cache.skips
    for key, skip in cache.skips.items():
        stored = cache.steps[0][key]
        assert stored.shape[-1] == seen[key].shape[-1] - cache.steps[0][skip].shape[-1]
        assert torch.equal(reader.full(key), seen[key])  # h from its own key, the skip from the other


def test_readers_of_one_edit_read_several_steps_at_once_and_the_same_values(sd1_pipe, monkeypatch):
    """Caches are recorded with each key's steps in one tensor; readers sharing a memo (an edit's)
    read each row set once for several steps; every step's values equal a lone reader's, across a
    delta chain, with int8 scales and skip keys."""
    engine = EditEngine.from_pipeline(sd1_pipe, cache_dtype=torch.int8)

    def recorded(version):  # in the all-steps layout as recorded, before any read: no copy to make
        c = version.cache
        for key in [k for k, kind in c.kinds.items() if kind in ("norm_input", "down_input", "up_input")]:
            storage = c.steps[-1][key].untyped_storage().data_ptr()
            assert c.steps_of(key).untyped_storage().data_ptr() == storage, key
        return version

    root = recorded(engine.generate(PROMPT, seed=3, num_inference_steps=4, output_type="latent"))
    child = recorded(engine.edit(root, EDIT, mask=blob_mask((16, 16), 0.3, seed=1), output_type="latent"))
    version = recorded(
        engine.edit(child, "a cat", mask=blob_mask((16, 16), 0.3, seed=2), output_type="latent")
    )
    cache, modules = version.cache, dict(sd1_pipe.unet.named_modules())
    keys = [k for k, kind in cache.kinds.items() if kind in ("norm_input", "down_input", "up_input")]
    assert any(k in cache.skips for k in keys) and "k:scale" not in keys
    cells = {
        k: torch.arange(0, cache.sizes[cache.levels[k]][0] * cache.sizes[cache.levels[k]][1], 3) for k in keys
    }
    stacked_reads = []
    steps_of = ActivationCache.steps_of
    monkeypatch.setattr(
        ActivationCache, "steps_of", lambda self, key: stacked_reads.append(key) or steps_of(self, key)
    )
    memo = {}

    def read_shared(read, *args):  # a later step reads nothing of the cache: it was read ahead
        stacked_reads.clear()
        values = read(*args)
        assert step == 0 or not stacked_reads, f"step {step} read {stacked_reads}"
        return values

    for step in range(cache.num_steps):
        shared, alone = cache.reader(step, memo=memo), cache.reader(step)
        assert len(shared.chain) == 3
        for key in keys:
            for grouped in (False, True):
                got = read_shared(shared.gather, key, cells[key], grouped)
                assert torch.equal(got, alone.gather(key, cells[key], grouped)), key
                if cache.kinds[key] == "norm_input":
                    args = (key, cells[key], modules[key], True, grouped)
                    got = read_shared(shared.gather_normalized, *args)
                    assert torch.equal(got, alone.gather_normalized(*args)), key


def cached_tensors(cache: ActivationCache) -> list[torch.Tensor]:
    return [t for step in cache.steps for t in step.values()]


def test_a_cache_device_keeps_the_same_caches_and_edits(sd1_pipe):
    """`cache_device` names where caches live; on the engine's own device it changes no bit, for a
    generation, an edit over it and an edit over that."""
    plain, kept = EditEngine.from_pipeline(sd1_pipe), EditEngine.from_pipeline(sd1_pipe, cache_device="cpu")
    results = []
    for engine in (plain, kept):
        root = engine.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")
        first = engine.edit(root, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
        second = engine.edit(first, "a cat", mask=blob_mask((16, 16), 0.2, seed=2), output_type="latent")
        results.append((root, first, second))
    for a, b in zip(*results, strict=True):
        assert b.cache.device == torch.device("cpu")
        assert_same_tensors(a.cache, b.cache)
        assert torch.equal(a.latents, b.latents)


def test_gather_to_reads_rows_or_everything():
    from fisedit_ray.kernels.transfer import gather_to

    x = torch.randn(3, 2, 10, 4)
    rows = torch.tensor([7, 1, 1, 4])
    assert torch.equal(gather_to(x, 2, rows, torch.device("cpu")), x.index_select(2, rows))
    assert gather_to(x, 2, None, torch.device("cpu")) is x  # on its device: no copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_engine_with_caches_in_host_memory_computes_the_same_edits(sd1_pipe):
    """Caches in pinned host memory, the rows an edit reads copied on a side stream: the same bits
    as caches in GPU memory, for a generation and two edits over it, and from a cache the object
    store gave back (pageable host memory)."""
    import copy

    pipe = copy.deepcopy(sd1_pipe).to("cuda")
    on_gpu, on_host = EditEngine.from_pipeline(pipe), EditEngine.from_pipeline(pipe, cache_device="cpu")
    results = []
    for engine in (on_gpu, on_host):
        root = engine.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")
        first = engine.edit(root, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
        batch = engine.edit_batch(
            [(first, "a cat", blob_mask((16, 16), r, seed=2)) for r in (0.05, 0.2)], output_type="latent"
        )
        results.append((root, first, *batch))
    for a, b in zip(*results, strict=True):
        assert all(t.is_cuda for t in cached_tensors(a.cache))
        assert all(t.device.type == "cpu" and t.is_pinned() for t in cached_tensors(b.cache))
        assert_same_tensors(a.cache, b.cache)
        assert torch.equal(a.latents, b.latents)
    root = results[1][0]
    root.cache = ActivationCache.from_arrays(root.cache.to_arrays())
    again = on_host.edit(root, EDIT, mask=blob_mask((16, 16), 0.1, seed=1), output_type="latent")
    assert torch.equal(again.latents, results[1][1].latents)
