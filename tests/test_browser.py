"""The Prefect and MLflow UIs in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium).

A person's path: open the Prefect UI, go to the `finetune` deployment, Run → Custom run, change train.max_steps in
the form, submit, wait for the run to complete, screenshot it, open the loss PNG among its artifacts; then open the
registered model version in the MLflow UI and read its model card.
Screenshots go to $TUNEPATH_SCREENSHOTS when set (CI keeps them), else to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.test_services import (SERVICE_OVERRIDES, changed_max_steps, run_logs, running_services, services_project,
                                 wait_for_run)
from tunepath.services import http

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("headless Chromium not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    # explicit driver path: Selenium Manager never tries to download one
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(tmp_path_factory, demo_assets):
    root = services_project(tmp_path_factory.mktemp("browser") / "project", demo_assets, SERVICE_OVERRIDES)
    with running_services(root) as report:
        yield root, report


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TUNEPATH_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def form_input(section: str, label: str) -> str:
    """XPath of the input of field `label` inside the form section `section` (Prefect's schema form)."""
    prop = "ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
    return (f"//span[normalize-space()='{section} (Optional)']/{prop}"
            f"//span[normalize-space()='{label} (Optional)']/{prop}//input")


def test_custom_run_from_the_prefect_ui_then_model_in_the_mlflow_ui(browser, live, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    root, report = live
    api = f"{report.prefect_url}/api"
    wait = WebDriverWait(browser, 90)
    default, steps = changed_max_steps(root) - 10, changed_max_steps(root)

    browser.get(f"{report.prefect_url}/deployments")
    wait.until(EC.element_to_be_clickable((By.XPATH, "//a[contains(@href, '/deployments/deployment/')][normalize-space()='finetune']"))).click()
    wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
    wait.until(EC.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Custom run']"))).click()
    field = wait.until(EC.presence_of_element_located((By.XPATH, form_input("3 · Train", "Max Steps"))))
    # the form in the order a person works: the recipe, data, model, then the training basics; no consts
    labels = [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, ".schema-form-property__label") if e.text.strip()]
    at = labels.index("Max Steps (Optional)")
    assert labels[:1] == ["recipe (Optional)"] and at < 16, labels[:20]  # above the fold, after data and model
    assert labels[at + 1:at + 3] == ["Learning Rate (Optional)", "Lora R (Optional)"], labels[:20]
    assert "is a const and cannot be changed" not in browser.page_source
    sections = [label for label in labels if "· " in label and label.split(" · ")[0] in ("1", "2", "3", "4", "5")]
    assert sections[:3] == ["1 · Data (Optional)", "2 · Model (Optional)", "3 · Train (Optional)"], sections  # the titles drawn
    assert labels.index("Advanced · Engine (Optional)") < labels.index("2 · Model (Optional)")  # data's own advanced fields
    assert labels.index("Advanced · Weight Decay (Optional)") > at  # the train section's basics, then its advanced fields
    browser.save_screenshot(str(shots / "prefect-custom-run-form-top.png"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    assert field.get_attribute("value") == str(default)  # params.yaml's value is the form's default
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(steps))
    browser.save_screenshot(str(shots / "prefect-custom-run-form.png"))
    started = time.time()
    browser.find_element(By.XPATH, "//button[@type='submit'][normalize-space()='Submit']").click()

    run_id = None
    deadline = time.monotonic() + 60
    while run_id is None and time.monotonic() < deadline:
        _, runs = http("POST", f"{api}/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 5})
        run_id = next((r["id"] for r in runs if r["parameters"]["config"]["train"]["max_steps"] == steps), None)
        time.sleep(1)
    assert run_id, "submitting the form created no flow run with the changed parameter"
    run = wait_for_run(api, run_id)
    assert run["state"]["type"] == "COMPLETED", run_logs(api, run_id)
    assert run["state"]["message"] is None or "fail" not in run["state"]["message"].lower()

    browser.get(f"{report.prefect_url}/runs/flow-run/{run_id}")
    wait.until(EC.presence_of_element_located((By.XPATH, "//*[normalize-space()='Completed']")))
    # the task runs are drawn on a canvas timeline: check them through the API the page reads from
    _, task_runs = http("POST", f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 50})
    finished = {t["name"] for t in task_runs if t["state"]["type"] == "COMPLETED"}
    assert "register" in finished, f"task runs completed: {sorted(finished)}"
    time.sleep(3)  # let the timeline finish drawing
    browser.save_screenshot(str(shots / "prefect-finetune-run.png"))
    print(f"flow run {run_id} completed {time.time() - started:.0f} s after Submit; screenshots in {shots}")

    # the loss PNG: listed on the flow run's Artifacts tab, drawn on the artifact's page (a data URI, no file server)
    wait.until(EC.element_to_be_clickable((By.XPATH, "//*[contains(concat(' ', @class, ' '), ' p-tab ')][normalize-space()='Artifacts']"))).click()
    wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'tunepath-train') or contains(text(), 'training loss curve')]")))
    browser.save_screenshot(str(shots / "prefect-finetune-run-artifacts.png"))
    _, artifacts = http("POST", f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["tunepath-train"]}, "flow_run_id": {"any_": [run_id]}}})
    assert len(artifacts) == 1, artifacts
    browser.get(f"{report.prefect_url}/artifacts/artifact/{artifacts[0]['id']}")
    picture = wait.until(EC.presence_of_element_located((By.XPATH, "//img[@alt='loss and learning rate']")))
    wait.until(lambda _: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture))
    assert picture.get_attribute("src").startswith("data:image/png;base64,")
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", picture)
    assert width > 300 and height > 150, (width, height)  # decoded: the browser drew the PNG
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", picture)
    time.sleep(1)
    browser.save_screenshot(str(shots / "prefect-loss-png.png"))

    # the model version's page in MLflow: its description is the model card
    record = json.loads((root / "artifacts" / "register" / "model.json").read_text(encoding="utf-8"))
    browser.get(f"{report.mlflow_url}/#/models/{record['name']}/versions/{record['version']}")
    wait.until(EC.presence_of_element_located((By.XPATH, "//h2[normalize-space()='Route and why']")))
    page = browser.find_element(By.TAG_NAME, "body").text
    for part in ("Route and why", "Data", "Evaluation", f"tunepath chat models:/{record['name']}@", record["tags"]["data_hash"][:12]):
        assert part in page, part
    time.sleep(1)
    browser.save_screenshot(str(shots / "mlflow-model-version-card.png"))

    browser.get(f"{report.mlflow_url}/#/models/tunepath-demo")
    wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(normalize-space(), 'candidate')]")))
    time.sleep(2)
    browser.save_screenshot(str(shots / "mlflow-model.png"))
    assert "tunepath-demo" in browser.page_source
    assert (shots / "prefect-finetune-run.png").stat().st_size > 10_000
