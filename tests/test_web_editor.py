"""The web editor in a real browser: Debian's Chromium and ChromeDriver (`apt-get install chromium
chromium-driver`, as `.ci/run` does), driven by Selenium, against the service on a local Ray with
the shipped scenes model. One session, step by step: generate, edit with the mask the service finds,
paint a mask and edit inside it with a dense regeneration beside, go back to the first version and
branch, reload. A screenshot of each step is kept in `out/web_editor/` (the test's artefacts).
Without the browser this is skipped, except in CI."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")
from ray import serve  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from service_helpers import local_serve, png_array  # noqa: E402

from fisedit_ray.deployments.app import build_app  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(__file__).parents[1] / "out" / "web_editor"
STEPS = 10
BASE = "a red circle at the top left"
EDIT = "a red circle at the top left and a blue square at the center"
PAINTED = f"{EDIT} and a green triangle at the bottom right"
BRANCH = "a red circle at the top left and a yellow circle at the bottom left"
# Chromium as root, in a closed network: no sandbox, and none of its own background connections
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,900",
)


@pytest.fixture(scope="module")
def service():
    with local_serve() as (base_url, _, _):
        serve.run(build_app({"model": "scenes"}), name="fisedit", route_prefix="/")
        yield base_url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must test the web editor: apt-get install chromium chromium-driver")
        pytest.skip("no Chromium and ChromeDriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=180):
    """`condition(driver)` once true; the page's error box, if it shows one, fails the test at once."""

    def check(d):
        error = d.find_element(By.ID, "error")
        assert not error.is_displayed(), f"the editor shows an error: {error.text}"
        return condition(d)

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check)


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def record_statuses(driver) -> None:
    """Keep every status line the page shows (`window.statuses`): the steps pushed while a request runs."""
    driver.execute_script(
        """const line = document.getElementById('status');
        window.statuses = [];
        new MutationObserver(() => statuses.push(line.textContent))
            .observe(line, {childList: true, characterData: true, subtree: true});"""
    )


def versions(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#tree button.version")


def figure(driver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'#figures tr[data-name="{name}"] td:last-child').text


def set_prompt(driver, text: str) -> None:
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(text)


def click(driver, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def api(driver, base_url: str) -> tuple[httpx.Client, dict]:
    """The session the page holds (from its localStorage), read through the API."""
    saved = driver.execute_script("return JSON.parse(localStorage.getItem('fisedit-session'))")
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {saved['token']}"})
    tree = client.get(f"/v1/sessions/{saved['session']}").json()
    return client, {v["version_id"]: v for v in tree["versions"]}


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_generate_edit_paint_and_branch(service, browser):
    driver = browser
    driver.get(f"{service}/")
    assert driver.title == "fisedit-ray editor"
    driver.execute_script("localStorage.clear()")
    driver.refresh()

    # 1. a prompt and its image, with the denoising steps shown as they run
    set_prompt(driver, BASE)
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys(str(STEPS))
    record_statuses(driver)
    click(driver, "generate")
    wait_for(driver, lambda d: status(d).startswith("generated"))
    seen = driver.execute_script("return window.statuses")
    pushed = [s for s in seen if s.startswith("denoising step")]
    assert pushed[-1] == f"denoising step {STEPS} of {STEPS}"
    assert len(set(pushed)) >= STEPS // 2, f"steps were not shown as they ran: {seen}"
    assert len(versions(driver)) == 1
    assert driver.execute_script("return document.getElementById('image').naturalWidth") == 64
    shot(driver, "1_generated")

    # 2. a changed prompt: the mask the service found, over the parent, and the edit
    set_prompt(driver, EDIT)
    record_statuses(driver)
    click(driver, "edit")
    wait_for(driver, lambda d: status(d).startswith("edited"))
    seen = driver.execute_script("return window.statuses")
    assert "finding the region the prompt change affects..." in seen
    assert len(versions(driver)) == 2
    assert driver.find_element(By.ID, "before-pane").is_displayed()
    assert figure(driver, "mask source") == "capture"
    share = float(figure(driver, "mask share").rstrip("%"))
    assert 0 < share < 50, share
    assert float(figure(driver, "MACs saved").rstrip("%")) > 0
    shot(driver, "2_edited_found_mask")

    # 3. a mask painted by hand (the bottom-right quarter), edited inside, dense regeneration beside
    paint = driver.find_element(By.ID, "paint")
    driver.execute_script("document.getElementById('brush-size').value = 12")
    cell = paint.size["width"] // 64  # screen pixels per image pixel; offsets are from the centre
    stroke = ActionChains(driver).move_to_element_with_offset(paint, 14 * cell, 14 * cell).click_and_hold()
    for dx, dy in ((12, 0), (0, 6), (-12, 0), (0, 6), (12, 0)):  # a filled patch, image pixels 40-64
        stroke = stroke.move_by_offset(dx * cell, dy * cell)
    stroke.release().perform()
    shot(driver, "3a_painted")
    set_prompt(driver, PAINTED)
    click(driver, "dense-beside")
    click(driver, "edit")
    wait_for(driver, lambda d: "dense regeneration" in status(d))
    assert figure(driver, "mask source") == "user"
    assert driver.find_element(By.ID, "dense-pane").is_displayed()
    assert len(versions(driver)) == 4  # the painted edit and its dense sibling
    client, by_id = api(driver, service)
    selected = driver.find_element(By.CSS_SELECTOR, "#tree button.version.selected").get_attribute(
        "data-version-id"
    )
    mask = png_array(client.get(by_id[selected]["mask_url"]).content)[..., 0] > 127
    rows, cols = np.nonzero(mask)
    assert mask.mean() < 0.25 and rows.min() >= 32 and cols.min() >= 32, "the mask is not where painted"
    edited = png_array(client.get(by_id[selected]["image_url"]).content)
    parent = png_array(client.get(by_id[by_id[selected]["parent"]]["image_url"]).content)
    assert np.array_equal(edited[:24, :24], parent[:24, :24]), "the edit changed pixels far from its mask"
    shot(driver, "3b_painted_edit_and_dense")

    # 4. back to the first version, and a branch from it
    root = next(v for v in versions(driver) if v.text.startswith(BASE + " generated"))
    root.click()
    wait_for(driver, lambda d: figure(d, "prompt") == BASE)
    set_prompt(driver, BRANCH)
    click(driver, "dense-beside")  # off again
    click(driver, "edit")
    wait_for(driver, lambda d: status(d).startswith("edited"))
    client, by_id = api(driver, service)
    root_id = next(v for v, row in by_id.items() if row["parent"] is None)
    children = sorted(row["prompt"] for row in by_id.values() if row["parent"] == root_id)
    assert children == sorted([BRANCH, EDIT])
    assert len(versions(driver)) == 5
    shot(driver, "4_branched")

    # 5. a reload shows the same session, from the service
    driver.refresh()
    wait_for(driver, lambda d: status(d) == "session restored")
    assert len(versions(driver)) == 5
    shot(driver, "5_restored")


def test_the_page_and_its_files_are_served_without_a_session(service):
    page = httpx.get(f"{service}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("editor.js", "text/javascript"), ("editor.css", "text/css")):
        served = httpx.get(f"{service}/web/{name}")
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
    assert httpx.get(f"{service}/web/..%2Fingress.py").status_code == 404
    # the page names only its own files: nothing from the network
    html = page.text
    assert "http://" not in html and "https://" not in html


def test_a_prompt_outside_the_scenes_grammar_is_served_with_warnings(service):
    made = httpx.post(f"{service}/v1/sessions", json={"prompt": "a gren circle", "steps": 2}, timeout=120)
    assert made.status_code == 201, made.text
    warnings = made.json()["warnings"]
    assert warnings and all('try "a green circle at the center"' in w for w in warnings), warnings
    fine = httpx.post(f"{service}/v1/sessions", json={"prompt": BASE, "steps": 2}, timeout=120).json()
    assert fine["warnings"] == []
