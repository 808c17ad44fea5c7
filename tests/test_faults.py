"""Faults under load: users generate and edit in a closed loop while an editor replica, the mask
generator, the cache owner and an ingress replica are killed in turn and Serve restarts them.

Every request succeeds or is refused with 503 and Retry-After (then retried, as a client should);
only requests in flight at the very ingress replica that is killed may instead get Ray's proxy's 500
(it answers a dead replica's requests that way). No acknowledged session or version is lost, and at
the end every version's image equals the one returned when it was made and the one the engine makes
alone from the same lineage."""

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402
from service_helpers import local_serve, mask_png, png_array  # noqa: E402

from fisedit_ray import EditEngine  # noqa: E402
from fisedit_ray.deployments.app import build_app  # noqa: E402
from fisedit_ray.masks import blob_mask  # noqa: E402

PROMPTS = ["a red circle at the top left", "a blue square at the center", "a green circle", "a white square"]
USERS, MIN_REQUESTS_PER_USER, DEADLINE_S = 3, 12, 180
# the second editor kill comes after the cache owner lost every stored version: rebuilds
FAULTS = ["Editor", "MaskGenerator", "CacheOwner", "Editor", "Ingress"]
PHASE = [None]
REPLICAS = {"Editor": 2, "MaskGenerator": 1, "CacheOwner": 1, "Ingress": 2}


class User:
    """A closed loop: generate, then edit random versions of the session (a third without a mask)."""

    def __init__(self, client: httpx.Client, seed: int, log: Counter, ingress_killed: threading.Event):
        self.client, self.rng, self.log, self.ingress_killed = (
            client,
            random.Random(seed),
            log,
            ingress_killed,
        )
        self.seed, self.versions, self.requests = seed, {}, 0  # version id -> (lineage, image bytes)

    def call(self, method: str, url: str, **kwargs) -> httpx.Response:
        for _ in range(60):
            r = self.client.request(method, url, **kwargs)
            self.requests += 1
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) > 0, r.headers
                self.log["503"] += 1
            elif r.status_code == 500 and self.ingress_killed.is_set():
                self.log["500 at the killed ingress"] += 1
            else:
                assert r.status_code < 300, (r.status_code, r.text, method, url, PHASE)
                self.log["ok"] += 1
                return r
            time.sleep(0.5)  # shorter than Retry-After: the test is bounded in time
        raise AssertionError(f"{method} {url}: no success after 60 tries")

    def generate(self) -> None:
        body = {"prompt": PROMPTS[0], "seed": self.seed, "steps": 2}
        made = self.call("POST", "/v1/sessions", json=body).json()
        self.session, self.auth = made["session_id"], {"Authorization": f"Bearer {made['token']}"}
        self._keep(made, [(PROMPTS[0], None)])

    def edit(self) -> None:
        # half of the edits branch from the generation, which the cache owner's restart loses
        parent = (
            next(iter(self.versions)) if self.rng.random() < 0.5 else self.rng.choice(list(self.versions))
        )
        prompt = self.rng.choice(PROMPTS[1:])
        mask = None if self.rng.random() < 1 / 3 else blob_mask((16, 16), 0.15, seed=self.rng.randrange(99))
        body = {"prompt": prompt, "mask_png": None if mask is None else mask_png(mask)}
        url = f"/v1/sessions/{self.session}/versions/{parent}/edits"
        made = self.call("POST", url, json=body, headers=self.auth).json()
        self.replica = made["stats"]["replica"]
        self.log["rebuilt"] += len(made["stats"]["rebuilt"])
        self.log["fetched"] += len(made["stats"]["fetched"])
        self._keep(made, [*self.versions[parent][0], (prompt, mask)])

    def _keep(self, made: dict, lineage: list) -> None:
        image = self.call("GET", made["image_url"], headers=self.auth).content
        self.versions[made["version_id"]] = (lineage, image)


def running(deployment: str) -> int:
    app = serve.status().applications.get("fisedit")
    return app.deployments[deployment].replica_states.get("RUNNING", 0) if app else 0


def replicas_of(deployment: str) -> dict[str, str]:
    """The deployment's replica actors: name -> namespace."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"]: a["namespace"] for a in actors if f"#{deployment}#" in a["name"]}


def kill_and_wait_for_restart(deployment: str, replica: str | None) -> float:
    """Kill a replica of `deployment` (the one whose id is `replica`, if given); seconds until Serve
    runs a new one in its place."""
    before = replicas_of(deployment)
    name = next((n for n in sorted(before) if replica and replica in n), sorted(before)[0])
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(name, namespace=before[name]), no_restart=True)
    while True:
        now = replicas_of(deployment)
        if name not in now and set(now) - set(before) and running(deployment) == REPLICAS[deployment]:
            return time.monotonic() - killed_at
        time.sleep(0.1)


def test_faults_under_load_lose_nothing():
    with local_serve() as (base_url, _, temp):
        app = {"model": "tiny", "editor_replicas": 2, "editor_cpus": 0.5, "ingress_replicas": 2}
        app["health_check_period_s"] = 2  # Serve replaces a dead replica within seconds
        serve.run(build_app(app), name="fisedit", route_prefix="/")
        log, recovered, ingress_killed, done = Counter(), [], threading.Event(), threading.Event()
        clients = [httpx.Client(base_url=base_url, timeout=120) for _ in range(USERS)]
        users = [User(c, seed, log, ingress_killed) for seed, c in enumerate(clients)]
        start = time.monotonic()

        def load(user: User) -> None:
            user.generate()
            while not done.is_set() or user.requests < MIN_REQUESTS_PER_USER:
                assert time.monotonic() - start < DEADLINE_S, "the loop ran past its deadline"
                user.edit()

        def faults() -> None:
            try:
                for deployment in FAULTS:
                    time.sleep(3)  # under load
                    PHASE[0] = deployment
                    if deployment == "Ingress":
                        ingress_killed.set()
                    # an editor that holds sessions: they move, their caches are fetched or rebuilt
                    busy = getattr(users[0], "replica", None) if deployment == "Editor" else None
                    recovered.append((deployment, round(kill_and_wait_for_restart(deployment, busy), 1)))
                    ingress_killed.clear()
            finally:
                done.set()

        with ThreadPoolExecutor(USERS + 1) as pool:
            futures = [pool.submit(load, user) for user in users] + [pool.submit(faults)]
            for future in futures:
                future.result()
        assert [d for d, _ in recovered] == FAULTS, recovered

        # nothing acknowledged was lost: every session's versions, images as first returned
        engine = EditEngine.from_pretrained("tiny")
        torch.set_num_threads(1)  # as the editors (editor_cpus < 1): the same last bits
        for user in users:
            tree = user.call("GET", f"/v1/sessions/{user.session}", headers=user.auth).json()
            assert {v["version_id"] for v in tree["versions"]} == set(user.versions)
            local = {}
            for version_id, (lineage, image) in user.versions.items():
                url = f"/v1/sessions/{user.session}/versions/{version_id}/image"
                assert user.call("GET", url, headers=user.auth).content == image
                expected = _replay(engine, user.seed, lineage, local)
                assert np.abs(png_array(image).astype(int) - np.asarray(expected.image)).max() <= 1
        print(f"\nfault test: {dict(log)}; seconds to recover: {recovered}; {time.monotonic() - start:.0f} s")
        assert log["ok"] >= USERS * MIN_REQUESTS_PER_USER
        for client in clients:
            client.close()


def _replay(engine: EditEngine, seed: int, lineage: list, done: dict):
    """The engine's version for `lineage` ((prompt, mask or None for an automatic one), root first)."""
    key = tuple((p, None if m is None else m.numpy().tobytes()) for p, m in lineage)
    if key not in done:
        if len(lineage) == 1:
            done[key] = engine.generate(lineage[0][0], seed=seed, num_inference_steps=2)
        else:
            parent = _replay(engine, seed, lineage[:-1], done)
            done[key] = engine.edit(parent, lineage[-1][0], mask=lineage[-1][1])
    return done[key]
