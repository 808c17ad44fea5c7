"""The activation cache: exact persistence, exact byte accounting, storage dtypes, deltas."""

import pytest
import torch
from safetensors.torch import load_file

from fisedit_ray import EditEngine
from fisedit_ray.cache import ActivationCache
from fisedit_ray.masks import blob_mask

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
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


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
            assert (a.full(key) - b.full(key)).abs().max() <= 1e-4, key
            if kind == "norm_input":
                assert torch.allclose(a.stats(key), b.stats(key), rtol=1e-6, atol=1e-3), key


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_compact_storage_dtypes(sd1_pipe, dtype, tol):
    fp32 = EditEngine.from_pipeline(sd1_pipe)
    compact = EditEngine.from_pipeline(sd1_pipe, cache_dtype=dtype)
    a = fp32.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")
    b = compact.generate(PROMPT, seed=3, num_inference_steps=3, output_type="latent")
    assert torch.equal(a.latents, b.latents)  # recording in any dtype leaves generation unchanged
    stats_a, stats_b = a.stats["cache_bytes"], b.stats["cache_bytes"]
    assert stats_b["storage_dtype"] == str(dtype).removeprefix("torch.")
    for kind in ("norm_input", "attn_key", "attn_value"):
        assert stats_b["per_kind"][kind] * 2 == stats_a["per_kind"][kind]
    mask = blob_mask((16, 16), 0.15, seed=6)
    reference = fp32.edit(a, EDIT, mask=mask, mode="reference", output_type="latent")
    sparse = compact.edit(b, EDIT, mask=mask, output_type="latent")
    assert (sparse.latents - reference.latents).abs().max() <= tol
    assert torch.equal(sparse.latents[..., ~mask], a.latents[..., ~mask])


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
