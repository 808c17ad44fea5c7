"""The editing service over HTTP on a local Ray (2 CPUs, two editor replicas, the tiny model)."""

import base64
import json
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402
from service_helpers import local_serve, mask_png, mask_png_bytes, png_array  # noqa: E402

from fisedit_ray import EditEngine  # noqa: E402
from fisedit_ray.deployments.app import build_app  # noqa: E402
from fisedit_ray.masks import blob_mask, mask_image  # noqa: E402

PROMPT, EDIT = "a red circle at the top left", "a blue square at the center"
MASK = blob_mask((16, 16), 0.2, seed=1)


@pytest.fixture(scope="module")
def service():
    with local_serve() as (base_url, metrics_url, _):
        app = build_app({"model": "tiny", "editor_replicas": 2, "editor_cpus": 0.5})
        serve.run(app, name="fisedit", route_prefix="/")
        with httpx.Client(base_url=base_url, timeout=120) as client:
            client.metrics_url = metrics_url
            yield client


@pytest.fixture(scope="module")
def engine():
    return EditEngine.from_pretrained("tiny")


@pytest.fixture
def one_thread():
    """Editor replicas run one torch thread (`editor_cpus` < 1): reduction order, hence the last bits
    of every float, depends on the thread count, so compare with results computed the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def create(client, prompt=PROMPT, seed=0, steps=3):
    r = client.post("/v1/sessions", json={"prompt": prompt, "seed": seed, "steps": steps})
    assert r.status_code == 201, r.text
    body = r.json()
    return body, {"Authorization": f"Bearer {body['token']}"}


def edit(client, session, auth, version, prompt=EDIT, mask=None, **extra):
    mask = blob_mask((16, 16), 0.2, seed=1) if mask is None else mask
    url = f"/v1/sessions/{session}/versions/{version}/edits"
    return client.post(url, json={"prompt": prompt, "mask_png": mask_png(mask), **extra}, headers=auth)


def test_results_equal_the_engine(service, engine, one_thread):
    body, auth = create(service)
    r = edit(service, body["session_id"], auth, body["version_id"])
    assert r.status_code == 201, r.text
    edited = r.json()
    parent = engine.generate(PROMPT, seed=0, num_inference_steps=3)
    child = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.2, seed=1))
    image = service.get(body["image_url"], headers=auth)
    assert image.headers["content-type"] == "image/png"
    assert np.array_equal(png_array(image.content), np.asarray(parent.image))
    assert np.array_equal(
        png_array(service.get(edited["image_url"], headers=auth).content), np.asarray(child.image)
    )
    mask = png_array(service.get(edited["mask_url"], headers=auth).content)
    assert np.array_equal(mask[..., 0] > 127, np.asarray(mask_image(child.mask, engine.vae_scale)) > 127)
    assert edited["stats"]["mask_ratio"] == child.stats["mask_ratio"]
    assert edited["stats"]["macs_executed"] == child.stats["macs_executed"]
    tree = service.get(f"/v1/sessions/{body['session_id']}", headers=auth).json()
    assert [v["parent"] for v in tree["versions"]] == [None, body["version_id"]]


def test_an_edit_without_a_mask_gets_its_mask_from_the_mask_generator(service, engine, one_thread):
    body, auth = create(service)
    url = f"/v1/sessions/{body['session_id']}/versions/{body['version_id']}/edits"
    r = service.post(url, json={"prompt": EDIT}, headers=auth)
    assert r.status_code == 201, r.text
    edited = r.json()
    child = engine.edit(engine.generate(PROMPT, seed=0, num_inference_steps=3), EDIT)
    assert edited["stats"]["mask_source"] == "capture" and edited["stats"]["capture_steps"] == 1
    # the mask generator holds no caches: it recomputes the parent's first step besides the probe
    assert edited["stats"]["capture_macs"] == 2 * child.stats["capture_macs"] > 0
    assert edited["stats"]["macs_executed"] == child.stats["macs_executed"] + child.stats["capture_macs"]
    assert edited["stats"]["seconds"]["mask"] > 0
    mask = png_array(service.get(edited["mask_url"], headers=auth).content)
    assert np.array_equal(mask[..., 0] > 127, np.asarray(mask_image(child.mask, engine.vae_scale)) > 127)
    image = png_array(service.get(edited["image_url"], headers=auth).content)
    assert np.array_equal(image, np.asarray(child.image))


def test_each_session_stays_on_one_replica(service):
    replicas = {}
    for seed in range(6):
        body, auth = create(service, seed=seed, steps=2)
        seen = {body["stats"]["replica"]}
        version = body["version_id"]
        for _ in range(2):
            r = edit(service, body["session_id"], auth, version)
            assert r.status_code == 201, r.text
            seen.add(r.json()["stats"]["replica"])
            assert r.json()["stats"]["rebuilt"] == []  # its versions were hot on that replica
            version = r.json()["version_id"]
        assert len(seen) == 1
        replicas[body["session_id"]] = seen.pop()
    # new sessions go to the replica with fewer live ones (earlier tests' sessions count too)
    per_replica = sorted(Counter(replicas.values()).values())
    assert len(per_replica) == 2 and max(per_replica) <= 4, per_replica


def kill_replica_of(service, auth, body):
    """Edit once, kill the replica that served it; returns that first edit."""
    first = edit(service, body["session_id"], auth, body["version_id"]).json()
    replica = first["stats"]["replica"]
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if replica in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    return first


@pytest.mark.parametrize("owner_has_it", [True, False], ids=["fetched", "rebuilt"])
def test_a_killed_replica_loses_nothing(service, engine, one_thread, owner_has_it):
    seed = 7 if owner_has_it else 8
    body, auth = create(service, seed=seed)
    first = kill_replica_of(service, auth, body)
    if not owner_has_it:  # the object store lost them too: rebuild from the lineage
        owner = serve.get_deployment_handle("CacheOwner", app_name="fisedit")
        assert owner.drop.remote(body["session_id"]).result() == 2
    r = edit(service, body["session_id"], auth, first["version_id"], prompt="a green circle")
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["stats"]["replica"] != first["stats"]["replica"]  # another replica, which held none
    ancestors = [body["version_id"], first["version_id"]]
    assert second["stats"]["fetched" if owner_has_it else "rebuilt"] == ancestors
    assert second["stats"]["rebuilt" if owner_has_it else "fetched"] == []
    parent = engine.generate(PROMPT, seed=seed, num_inference_steps=3)
    child = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.2, seed=1))
    grandchild = engine.edit(child, "a green circle", mask=blob_mask((16, 16), 0.2, seed=1))
    got = png_array(service.get(second["image_url"], headers=auth).content)
    assert np.array_equal(got, np.asarray(grandchild.image))


def test_a_session_token_reads_only_its_session(service):
    a, auth_a = create(service)
    b, auth_b = create(service)
    assert service.get(f"/v1/sessions/{b['session_id']}", headers=auth_a).status_code == 404
    assert service.get(b["image_url"], headers=auth_a).status_code == 404
    assert edit(service, b["session_id"], auth_a, b["version_id"]).status_code == 404
    assert service.delete(f"/v1/sessions/{b['session_id']}", headers=auth_a).status_code == 404
    assert service.get(f"/v1/sessions/{b['session_id']}").status_code == 401
    assert service.get(f"/v1/sessions/{b['session_id']}", headers=auth_b).status_code == 200
    assert service.delete(f"/v1/sessions/{a['session_id']}", headers=auth_a).status_code == 200
    assert service.get(f"/v1/sessions/{a['session_id']}", headers=auth_a).status_code == 404


BAD_CREATE = [
    ({"seed": 1}, "prompt"),  # missing field
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "blank"),
    ({"prompt": "a red circle", "steps": 0}, "steps"),
    ({"prompt": "a red circle", "steps": 10_000}, "steps"),
    ({"prompt": "a red circle", "guidance": -1}, "guidance"),
    ({"prompt": "a red circle", "size": 63}, "multiple of"),
    ({"prompt": "a red circle", "colour": "red"}, "colour"),
    ({"prompt": " ".join(["red"] * 100)}, "tokens long"),
]


@pytest.mark.parametrize("body, words", BAD_CREATE, ids=[w for _, w in BAD_CREATE])
def test_bad_session_requests_get_a_4xx_that_says_why(service, body, words):
    r = service.post("/v1/sessions", json=body)
    assert 400 <= r.status_code < 500 and words in r.text, r.text


def test_malformed_bodies_get_a_4xx_that_says_why_and_change_nothing(service):
    before = service.get("/healthz").json()["sessions"]
    as_json = {"content-type": "application/json"}
    cases = [
        (b"{not json", as_json, 400, "not valid JSON"),
        ('{"prompt": "caf\u00e9"}'.encode("latin-1"), as_json, 400, "not valid UTF-8"),
        (b"[1, 2]", as_json, 422, "must be a JSON object"),
        (b"prompt=a red circle", {"content-type": "text/plain"}, 415, "unsupported content type"),
    ]
    for content, headers, status, words in cases:
        r = service.post("/v1/sessions", content=content, headers=headers)
        assert r.status_code == status and words in r.json()["detail"], r.text
    assert service.get("/healthz").json()["sessions"] == before


def test_unknown_ids(service):
    body, auth = create(service)
    assert service.get("/v1/sessions/nope", headers=auth).status_code == 404
    r = edit(service, body["session_id"], auth, "nope")
    assert r.status_code == 404 and "no version" in r.text


def test_multipart_forms_as_curl_sends_them(service):
    """`curl -F prompt=... -F mask=@mask.png`: the same versions as the JSON API makes."""
    r = service.post("/v1/sessions", data={"prompt": PROMPT, "seed": "0", "steps": "3"})
    assert r.status_code == 201, r.text
    form, auth = r.json(), {"Authorization": f"Bearer {r.json()['token']}"}
    body, json_auth = create(service)
    root = service.get(form["image_url"], headers=auth).content
    assert np.array_equal(
        png_array(root), png_array(service.get(body["image_url"], headers=json_auth).content)
    )
    mask = blob_mask((16, 16), 0.2, seed=1)
    url = f"/v1/sessions/{form['session_id']}/versions/{form['version_id']}/edits"
    upload = {"mask": ("mask.png", mask_png_bytes(mask), "image/png")}
    r = service.post(url, data={"prompt": EDIT}, files=upload, headers=auth)
    assert r.status_code == 201, r.text
    by_json = edit(service, body["session_id"], json_auth, body["version_id"], mask=mask).json()
    got = png_array(service.get(r.json()["image_url"], headers=auth).content)
    assert np.array_equal(got, png_array(service.get(by_json["image_url"], headers=json_auth).content))
    bad = [
        ({"image": ("x.png", mask_png_bytes(mask), "image/png")}, "only 'mask' is a file"),
        ({"mask": ("x.gif", b"GIF89a....", "image/gif")}, "not a PNG"),
    ]
    for files, words in bad:
        r = service.post(url, data={"prompt": EDIT}, files=files, headers=auth)
        assert r.status_code == 422 and words in r.text, r.text
    assert len(service.get(f"/v1/sessions/{form['session_id']}", headers=auth).json()["versions"]) == 2


def test_a_png_that_declares_huge_dimensions_is_refused_before_decoding(service):
    body, auth = create(service)
    ihdr = b"IHDR" + (100_000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = (
        b"\x89PNG\r\n\x1a\n" + len(ihdr[4:]).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    )
    url = f"/v1/sessions/{body['session_id']}/versions/{body['version_id']}/edits"
    r = service.post(url, json={"prompt": EDIT, "mask_png": base64.b64encode(bomb).decode()}, headers=auth)
    assert r.status_code == 422 and "declares 100000 x 100000 pixels" in r.text, r.text


def test_bodies_over_the_limit_get_413_and_a_busy_session_429(service):
    limited = {"model": "tiny", "editor_cpus": 0.25, "max_body_bytes": 4096, "session_max_edits": 2}
    serve.run(build_app(limited), name="limited", route_prefix="/limited")
    try:
        r = service.post("/limited/v1/sessions", json={"prompt": PROMPT, "padding": "x" * 5000})
        assert r.status_code == 413 and "the limit is 4096 bytes" in r.text, r.text
        r = service.post("/limited/v1/sessions", json={"prompt": PROMPT, "steps": 20})
        body, auth = r.json(), {"Authorization": f"Bearer {r.json()['token']}"}
        url = f"/limited/v1/sessions/{body['session_id']}/versions/{body['version_id']}/edits"
        mask = mask_png(blob_mask((16, 16), 0.3, seed=1))

        def post(k):
            return service.post(url, json={"prompt": f"a square {k}", "mask_png": mask}, headers=auth)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        codes = Counter(r.status_code for r in answers)
        assert set(codes) == {201, 429} and codes[201] >= 2, codes
        assert all(
            "2 edits running" in r.text and r.headers["retry-after"] for r in answers if r.status_code == 429
        )
        tree = service.get(f"/limited/v1/sessions/{body['session_id']}", headers=auth).json()
        assert len(tree["versions"]) == 1 + codes[201]
    finally:
        serve.delete("limited")


def test_bad_edits_get_a_4xx_and_leave_the_session_intact(service):
    body, auth = create(service)
    url = f"/v1/sessions/{body['session_id']}/versions/{body['version_id']}/edits"
    cases = [
        ({"prompt": EDIT, "mask_png": "!!!"}, "base64"),
        ({"prompt": EDIT, "mask_png": base64.b64encode(b"GIF89a...").decode()}, "not a PNG"),
        ({"prompt": EDIT, "mask_png": mask_png(np.ones((5, 5), bool))}, "expected the latent size"),
        ({"prompt": EDIT, "mask_png": mask_png(np.ones((16, 16), bool)), "mode": "fast"}, "mode"),
        ({"prompt": " ".join(["blue"] * 100), "mask_png": mask_png(np.ones((16, 16), bool))}, "tokens long"),
    ]
    for payload, words in cases:
        r = service.post(url, json=payload, headers=auth)
        assert 400 <= r.status_code < 500 and words in r.text, (payload.get("mode"), r.text)
    tree = service.get(f"/v1/sessions/{body['session_id']}", headers=auth).json()
    assert len(tree["versions"]) == 1
    assert edit(service, body["session_id"], auth, body["version_id"]).status_code == 201


def test_health_and_metrics(service):
    assert service.get("/healthz").json()["status"] == "ok"
    body, auth = create(service)
    assert edit(service, body["session_id"], auth, body["version_id"]).status_code == 201
    wanted = ["ray_fisedit_phase_seconds", "ray_fisedit_mask_ratio", "ray_fisedit_cache_lookups_total"]
    wanted += ["ray_fisedit_batch_size", "ray_fisedit_requests_in_flight"]
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while time.monotonic() < deadline:
        text = httpx.get(service.metrics_url).text
        if all(name in text for name in wanted):
            break
        time.sleep(1)
    assert all(name in text for name in wanted), [n for n in wanted if n not in text]
    assert 'result="hit"' in text and 'phase="sparse_steps"' in text


def test_python_client(service, engine, one_thread):
    from fisedit_ray.client import Client, ServiceError

    client = Client(str(service.base_url))
    session = client.create_session(PROMPT, seed=4, steps=3)
    mask = blob_mask((16, 16), 0.3, seed=2)
    child = session.edit(session.root["version_id"], EDIT, mask)
    expected = engine.edit(engine.generate(PROMPT, seed=4, num_inference_steps=3), EDIT, mask=mask)
    assert np.array_equal(np.asarray(session.image(child).convert("RGB")), np.asarray(expected.image))
    assert [v["version_id"] for v in session.versions()] == [session.root["version_id"], child["version_id"]]
    session.delete()
    with pytest.raises(ServiceError, match="404"):
        session.versions()
    client.close()


@pytest.mark.parametrize("name", ["local_cpu.yaml", "multi_gpu.yaml", "rayservice.yaml"])
def test_serve_configs_are_valid(name):
    import importlib.resources

    import yaml
    from ray.serve.schema import ServeDeploySchema

    text = (importlib.resources.files("fisedit_ray.deployments") / "configs" / name).read_text()
    config = yaml.safe_load(text)
    if config.get("kind") == "RayService":
        config = yaml.safe_load(config["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "fisedit_ray.deployments.app:build_app"
    build_app(app.args)  # the arguments are ones the builder takes


def test_dense_and_empty_edits_are_served(service):
    body, auth = create(service)
    r = edit(service, body["session_id"], auth, body["version_id"], mode="dense")
    assert r.status_code == 201 and r.json()["stats"]["mode"] == "dense", r.text
    r = edit(service, body["session_id"], auth, body["version_id"], mask=np.zeros((16, 16), bool))
    assert r.status_code == 201 and r.json()["stats"]["macs_executed"] == 0, r.text


def test_a_full_queue_answers_503_with_retry_after(service):
    tight = {"model": "tiny", "editor_cpus": 0.25, "max_ongoing_requests": 1, "max_queued_requests": 1}
    serve.run(build_app(tight), name="tight", route_prefix="/tight")
    try:
        body = {"prompt": PROMPT, "steps": 10}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: service.post("/tight/v1/sessions", json=body), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 201 in codes and 503 in codes, codes
        assert all(r.headers.get("retry-after") == "2" for r in answers if r.status_code == 503)
        from fisedit_ray.client import Client

        client = Client(f"{str(service.base_url).rstrip('/')}/tight", retries=30)  # waits as told
        with ThreadPoolExecutor(8) as pool:
            sessions = list(pool.map(lambda _: client.create_session(PROMPT, steps=10), range(8)))
        assert len({s.id for s in sessions}) == 8
    finally:
        serve.delete("tight")


def streamed(client, url: str, body: dict, auth: dict | None = None) -> list[dict]:
    """The events of a `?stream=true` request, in order."""
    with client.stream("POST", f"{url}?stream=true", json=body, headers=auth or {}) as r:
        assert r.status_code == 201 and r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines() if line]


def test_streamed_requests_push_each_step_then_the_version(service, engine, one_thread):
    events = streamed(service, "/v1/sessions", {"prompt": PROMPT, "seed": 5, "steps": 3})
    assert events[:-1] == [{"event": "step", "step": i, "steps": 3} for i in (1, 2, 3)]
    made = events[-1]
    assert made["event"] == "version" and made["warnings"] == []
    auth = {"Authorization": f"Bearer {made['token']}"}
    url = f"/v1/sessions/{made['session_id']}/versions/{made['version_id']}/edits"
    events = streamed(service, url, {"prompt": EDIT}, auth)  # the mask found first, then the steps
    assert [e["event"] for e in events] == ["mask", "step", "step", "step", "version"]
    parent = engine.generate(PROMPT, seed=5, num_inference_steps=3)
    image = png_array(service.get(events[-1]["image_url"], headers=auth).content)
    assert np.array_equal(image, np.asarray(engine.edit(parent, EDIT).image))

    # edits that run as one batch each hear every step of it
    bodies = [{"prompt": f"a {c} square", "mask_png": mask_png(MASK)} for c in ("blue", "green", "white")]
    with ThreadPoolExecutor(len(bodies)) as pool:
        runs = list(pool.map(lambda body: streamed(service, url, body, auth), bodies))
    for events in runs:
        assert [e.get("step") for e in events[:-1]] == [1, 2, 3] and events[-1]["event"] == "version"

    # what would have been an error status comes as the last event, and nothing is stored
    too_long = " ".join(["red"] * 100)
    events = streamed(service, url, {"prompt": too_long, "mask_png": mask_png(MASK)}, auth)
    assert events[-1]["event"] == "error" and events[-1]["status"] == 400
    assert "tokens long" in events[-1]["detail"]
    tree = service.get(f"/v1/sessions/{made['session_id']}", headers=auth).json()
    assert len(tree["versions"]) == 2 + len(bodies)


def test_concurrent_edits_on_one_replica_are_batched_and_equal_alone(service, engine, one_thread):
    """More edits of one session at once than its replica takes (16): the rest wait for that replica
    (strict affinity) instead of spilling to one that would fetch the parent first."""
    body, auth = create(service, seed=11)
    colors = ("blue", "green", "white", "yellow", "purple", "red", "black", "orange", "pink", "gray")
    masks = [blob_mask((16, 16), 0.1, seed=s) for s in range(2 * len(colors))]
    prompts = [f"a {c} {shape}" for shape in ("square", "circle") for c in colors]
    url = f"/v1/sessions/{body['session_id']}/versions/{body['version_id']}/edits"

    def post(k):
        return service.post(url, json={"prompt": prompts[k], "mask_png": mask_png(masks[k])}, headers=auth)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(post, range(len(prompts))))
    assert all(r.status_code == 201 for r in answers), [r.text for r in answers]
    stats = [r.json()["stats"] for r in answers]
    assert len({s["replica"] for s in stats}) == 1 and all(s["fetched"] == [] for s in stats)
    assert max(s["batch_size"] for s in stats) > 1  # some ran in one sparse pass
    parent = engine.generate(PROMPT, seed=11, num_inference_steps=3)
    for k, r in enumerate(answers):
        alone = engine.edit(parent, prompts[k], mask=masks[k])
        got = png_array(service.get(r.json()["image_url"], headers=auth).content).astype(int)
        assert np.abs(got - np.asarray(alone.image)).max() <= 1  # batched GEMMs round differently


def deploy_with_session(service, name: str, args: dict, seed: int):
    """Deploy the app `name` with `args` beside the main one and generate in it: the generation, its
    auth header, and a function that edits the generation inside a fixed mask."""
    serve.run(build_app({"model": "tiny", "editor_cpus": 0.25, **args}), name=name, route_prefix=f"/{name}")
    r = service.post(f"/{name}/v1/sessions", json={"prompt": PROMPT, "seed": seed, "steps": 3})
    body, auth = r.json(), {"Authorization": f"Bearer {r.json()['token']}"}

    def edit_root(prompt: str, version: str = body["version_id"]) -> dict:
        url = f"/{name}/v1/sessions/{body['session_id']}/versions/{version}/edits"
        return service.post(url, json={"prompt": prompt, "mask_png": mask_png(MASK)}, headers=auth).json()

    return body, auth, edit_root


def test_an_editor_over_its_byte_budget_fetches_what_it_evicted(service, engine, one_thread):
    try:  # only the newest version stays hot
        body, auth, edit_root = deploy_with_session(service, "small", {"editor_hot_gib": 1e-6}, seed=5)
        assert edit_root(EDIT)["stats"]["fetched"] == []  # its parent was hot
        second = edit_root("a cat")
        assert second["stats"]["fetched"] == [body["version_id"]]  # evicted by the first edit
        expected = engine.edit(engine.generate(PROMPT, seed=5, num_inference_steps=3), "a cat", mask=MASK)
        assert second["image_url"].startswith("/small/v1/")  # links carry the app's route prefix
        got = png_array(service.get(second["image_url"], headers=auth).content)
        assert np.array_equal(got, np.asarray(expected.image))
        from fisedit_ray.client import Client

        remote = Client(f"{str(service.base_url).rstrip('/')}/small").create_session(PROMPT, seed=5, steps=3)
        root = service.get(body["image_url"], headers=auth).content
        assert np.array_equal(np.asarray(remote.image(remote.root)), png_array(root))
    finally:
        serve.delete("small")


def test_caches_keep_to_their_budgets_and_expiry_and_rebuild_what_they_lost(service, engine, one_thread):
    """Budgets that hold only the newest version, on the editor and in the object store, and a one
    second idle expiry: what they evicted is rebuilt from the lineage, the same image as before."""
    args = {"editor_hot_gib": 1e-6, "cache_store_gib": 1e-6, "cache_idle_s": 1, "health_check_period_s": 1}
    try:
        body, auth, edit_root = deploy_with_session(service, "bounded", args, seed=6)
        assert edit_root(EDIT)["stats"]["rebuilt"] == []  # its parent was hot
        second = edit_root("a cat")
        assert second["stats"]["rebuilt"] == [body["version_id"]]  # evicted everywhere by the first edit
        parent = engine.generate(PROMPT, seed=6, num_inference_steps=3)
        got = png_array(service.get(second["image_url"], headers=auth).content)
        assert np.array_equal(got, np.asarray(engine.edit(parent, "a cat", mask=MASK).image))
        time.sleep(3)  # idle: the newest version, which the budgets keep, expires too
        third = edit_root(EDIT, version=second["version_id"])
        assert third["stats"]["rebuilt"] == [body["version_id"], second["version_id"]]
        wanted = [f'where="{w}"' for w in ("editor", "object_store")] + ['reason="budget"', 'reason="idle"']
        deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
        while time.monotonic() < deadline:
            text = "\n".join(
                line for line in httpx.get(service.metrics_url).text.splitlines() if "evictions" in line
            )
            if all(w in text for w in wanted):
                break
            time.sleep(1)
        assert "ray_fisedit_cache_evictions_total" in text and all(w in text for w in wanted), text
    finally:
        serve.delete("bounded")


def test_an_editor_computes_off_its_event_loop():
    """The engine runs in a worker thread: a replica whose event loop waited out every queued request's
    compute would miss Serve's health checks under load (30 s) and be killed mid-request. Here the
    engine waits until the loop itself releases it, which it can only do while the engine runs."""
    import asyncio
    import threading

    from fisedit_ray.deployments.editor import Editor

    editor = Editor(model="tiny", owner=None)
    editor.replica = lambda: "here"  # outside Serve: no replica context
    started, release = threading.Event(), threading.Event()
    generate = editor.engine.generate

    def waiting_generate(*args, **kwargs):
        started.set()
        if not release.wait(timeout=30):
            raise RuntimeError("the editor's event loop was blocked while its engine ran")
        return generate(*args, **kwargs)

    editor.engine.generate = waiting_generate
    root = {"id": "v0", "prompt": PROMPT, "seed": 0, "steps": 2, "guidance": 7.5, "size": 64}

    async def run() -> dict:
        task = asyncio.ensure_future(editor.run("s", [root]))
        while not started.is_set():
            await asyncio.sleep(0.01)
        release.set()  # from the loop, while the engine's thread is inside `generate`
        return await task

    result = asyncio.run(run())
    assert result["version_id"] == "v0" and result["image_png"].startswith(b"\x89PNG")


def test_edits_that_arrive_while_a_batch_runs_form_the_next_batch_together(monkeypatch):
    """`serve.batch` alone would form a batch of each edit that came later than the batch wait while
    the engine was busy (three batches here); an editor holds them until the engine is free."""
    import asyncio
    import threading

    from ray.serve import batching

    from fisedit_ray.deployments.editor import Editor

    # outside Serve: no replica context for the batcher's check of `max_ongoing_requests` (a warning)
    monkeypatch.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda q: None
    )

    roots = {
        s: {"id": "v0", "prompt": PROMPT, "seed": i, "steps": 2, "guidance": 7.5, "size": 64}
        for i, s in enumerate("abc")
    }
    mask = base64.b64decode(mask_png(blob_mask((32, 32), 0.2, seed=1)))  # latent size at 64 px
    edit = {"id": "v1", "prompt": EDIT, "mask_png": mask, "mode": "sparse"}
    started, release, sizes = threading.Event(), threading.Event(), []

    async def run() -> list[dict]:
        # built on the loop that runs it, as in a replica (its batcher binds to the running loop)
        editor = Editor(model="tiny", owner=None, batch_wait_s=0.05)
        editor.replica = lambda: "here"  # outside Serve: no replica context
        edit_batch = editor.engine.edit_batch

        def waiting_edit_batch(requests, **kwargs):
            sizes.append(len(requests))
            started.set()
            if not release.wait(timeout=30):
                raise RuntimeError("never released")
            return edit_batch(requests, **kwargs)

        editor.engine.edit_batch = waiting_edit_batch
        for s, root in roots.items():
            await editor.run(s, [root])
        first = asyncio.ensure_future(editor.run("a", [roots["a"], edit]))
        while not started.is_set():
            assert not first.done(), first.result()
            await asyncio.sleep(0.01)
        later = []
        for s in "bc":  # each comes longer than the batch wait after the one before
            later.append(asyncio.ensure_future(editor.run(s, [roots[s], edit])))
            await asyncio.sleep(0.3)
        release.set()
        return await asyncio.gather(first, *later)

    results = asyncio.run(run())
    assert all("error" not in r for r in results), results
    assert sizes == [1, 2]
    assert [r["stats"]["batch_size"] for r in results] == [1, 2, 2]
