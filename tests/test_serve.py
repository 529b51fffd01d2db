"""retom-jax serve (retom_jax/serve): batching keeps every image what a call alone gives,
bad requests get a 4xx JSON error while the server serves on, the bearer token, a request
failing inside the model fails alone, a load test on loopback (none lost or answered
twice), SIGTERM finishes the request in flight, and the web page in headless chromium.

One demo pipeline and one server for the module; 64 px, 2-3 steps, batch buckets 1 and 4.
"""
import base64
import concurrent.futures
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import retom_jax as rj  # noqa: E402
from retom_jax.serve import create_app, serve_in_background  # noqa: E402
from retom_jax.serve.loadtest import load_test  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a yellow background",
           "a blue triangle on a red background", "a yellow circle on a green background"]
STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return rj.load_pipeline("demo")


@pytest.fixture(scope="module")
def server(pipe):
    srv = serve_in_background(create_app(pipe, buckets=(1, 4), max_wait=0.3,
                                         default_steps=STEPS, model_name="demo"))
    yield srv
    srv.stop()


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=300, **kw)


def concurrently(fn, items):
    with concurrent.futures.ThreadPoolExecutor(len(items)) as ex:
        return list(ex.map(fn, items))


def png_array(text):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_batched_images_equal_one_at_a_time(pipe, server):
    """Four requests sent together run as one call and give, byte for byte, the PNGs they
    give sent one at a time with one-bucket batching (every call padded to 4 rows); a lone
    request in bucket 1 gives exactly ``pipe(prompt, seed=seed)``'s image."""
    app4 = create_app(pipe, buckets=(4,), max_wait=1.0, default_steps=STEPS)
    srv4 = serve_in_background(app4)
    try:
        bodies = [{"prompt": p, "seed": 10 + i} for i, p in enumerate(PROMPTS)]
        calls = app4.state.batcher.calls
        together = concurrently(lambda b: post(srv4.url, "/sdapi/v1/txt2img", b), bodies)
        assert app4.state.batcher.calls == calls + 1  # one call of the compiled program
        alone = [post(srv4.url, "/sdapi/v1/txt2img", b) for b in bodies]
    finally:
        srv4.stop()
    for t, a in zip(together, alone):
        assert t.status_code == a.status_code == 200
        assert t.json()["images"] == a.json()["images"]
        assert json.loads(t.json()["info"])["all_seeds"] == json.loads(a.json()["info"])["all_seeds"]
    # bucket 1 (the module's server): the pipeline's own image for the seed
    r = post(server.url, "/sdapi/v1/txt2img", {"prompt": PROMPTS[1], "seed": 11,
                                               "batch_size": 1})
    expected = pipe(PROMPTS[1], seed=11, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(png_array(r.json()["images"][0]),
                                  (expected[0] * 255).round().astype(np.uint8))
    # another bucket rounds the last float bit differently at most
    diff = np.abs(png_array(r.json()["images"][0]).astype(int)
                  - png_array(together[1].json()["images"][0]).astype(int))
    assert diff.max() <= 1
    # image i of a request is the image of seed + i
    two = post(server.url, "/sdapi/v1/txt2img", {"prompt": PROMPTS[1], "seed": 10,
                                                 "batch_size": 2}).json()
    assert json.loads(two["info"])["all_seeds"] == [10, 11]
    assert json.loads(two["info"])["sampler_name"] == "PLMS"  # the demo model's PNDM
    assert np.abs(png_array(two["images"][1]).astype(int)
                  - png_array(r.json()["images"][0]).astype(int)).max() <= 1


BAD = [
    ('{"prompt": ', 400),                                         # malformed JSON
    ('[1, 2]', 422),                                              # not an object
    ('{"prompt": 3}', 422),                                       # wrong type
    ('{"prompt": "x", "steps": "many"}', 422),
    ('{"prompt": "x", "steps": 0}', 422),                         # out of range
    ('{"prompt": "x", "steps": 100000}', 422),
    ('{"prompt": "x", "width": 4096}', 422),
    ('{"prompt": "x", "height": 66}', 422),
    ('{"prompt": "x", "batch_size": 50}', 422),                   # too many images
    ('{"prompt": "x", "cfg_scale": 1e999}', 422),
    ('{"prompt": "x", "sampler_name": "nope"}', 422),
]


def test_bad_requests_get_json_errors_and_the_server_serves_on(server):
    for body, status in BAD:
        r = httpx.post(server.url + "/sdapi/v1/txt2img", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["error"], str) and "\n" not in r.json()["error"], body
    for body, status in [
        ({"prompt": "x", "init_images": ["not base64 at all!"]}, 400),
        ({"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()]}, 400),
        ({"prompt": "x", "init_images": []}, 422),
        ({"prompt": "x"}, 422),
    ]:
        r = post(server.url, "/sdapi/v1/img2img", body)
        assert r.status_code == status and "error" in r.json(), (body, r.text)
    for body in [{"prompt": "x", "merge": {"method": "retom", "todo_factor": 2}},
                 {"prompt": "x", "merge": {"method": "retom", "ratio": 2.0}},
                 {"prompt": "x", "merge": {"method": "todo"}, "merge_map": {}},
                 {"prompt": "x", "lora_scale": 0.5}, {"prompt": "x", "unknown": 1},
                 {"prompt": "x", "step_cache": {"interval": 0}}]:
        r = post(server.url, "/retom/v1/generate", body)
        assert r.status_code == 422 and "error" in r.json(), (body, r.text)
    big = b'{"prompt": "' + b"x" * (17 * 2 ** 20) + b'"}'
    r = httpx.post(server.url + "/sdapi/v1/txt2img", content=big, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(server.url + "/retom/v1/jobs/nope").status_code == 404
    ok = post(server.url, "/sdapi/v1/txt2img", {"prompt": PROMPTS[0], "seed": 1})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_token(pipe, monkeypatch):
    monkeypatch.setenv("RETOM_JAX_SERVE_TOKEN", "s3cret")
    app = create_app(pipe, buckets=(1,), default_steps=STEPS)
    srv = serve_in_background(app)
    try:
        assert srv.host == "127.0.0.1"
        body = {"prompt": PROMPTS[0], "seed": 1}
        r = post(srv.url, "/sdapi/v1/txt2img", body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert post(srv.url, "/sdapi/v1/txt2img", body,
                    headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(srv.url, "/sdapi/v1/txt2img", body,
                    headers={"Authorization": "Bearer s3cret"}).status_code == 200
        health = httpx.get(srv.url + "/health").json()
        assert health["auth"] is True and health["status"] == "ok"
        assert httpx.get(srv.url + "/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]
    finally:
        srv.stop()


def test_a_request_failing_inside_the_model_fails_alone(server, monkeypatch):
    """Three requests batched together, one of which makes the model raise: the call is
    retried request by request, the two others are answered, the failing one gets 500 (a
    ValueError from the pipeline, e.g. its memory check: 422)."""
    cls = type(server.app.state.engine.pipe)
    original = cls.__call__

    def flaky(self, prompt, *a, **kw):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if any("boom" in p for p in prompts):
            raise RuntimeError("out of memory (simulated)")
        if any("refuse" in p for p in prompts):
            raise ValueError("the images need 99 GiB (simulated memory check)")
        return original(self, prompt, *a, **kw)

    monkeypatch.setattr(cls, "__call__", flaky)
    bodies = [{"prompt": PROMPTS[0], "seed": 5}, {"prompt": "boom", "seed": 6},
              {"prompt": "refuse", "seed": 7}, {"prompt": PROMPTS[2], "seed": 8}]
    rs = concurrently(lambda b: post(server.url, "/sdapi/v1/txt2img", b), bodies)
    assert [r.status_code for r in rs] == [200, 500, 422, 200]
    assert "simulated" in rs[1].json()["error"] and "simulated" in rs[2].json()["error"]


def test_native_options_jobs_and_merge_map(server):
    body = {"prompt": PROMPTS[0], "seed": 3, "steps": 2,
            "merge": {"method": "retom", "ratio": 0.5, "window": [2, 2]}}
    r = post(server.url, "/retom/v1/generate", body)
    assert r.status_code == 200, r.text
    assert r.json()["seeds"] == [3] and "ReToM" in r.json()["info"]["merge"]
    job = post(server.url, "/retom/v1/jobs", body).json()
    for _ in range(600):
        s = httpx.get(f"{server.url}/retom/v1/jobs/{job['id']}").json()
        if s["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert s["state"] == "done" and s["images"] == r.json()["images"]
    cached = post(server.url, "/retom/v1/generate",
                  {**body, "steps": 4, "step_cache": {"interval": 2, "depth": 1}})
    assert cached.status_code == 200, cached.text
    assert "StepCache(interval=2, depth=1)" in cached.json()["info"]["step_cache"]
    init = r.json()["images"][0]
    i2i = post(server.url, "/sdapi/v1/img2img", {"prompt": PROMPTS[1], "seed": 3, "steps": 2,
                                                 "init_images": ["data:image/png;base64,"
                                                                 + init],
                                                 "denoising_strength": 0.5})
    assert i2i.status_code == 200, i2i.text
    assert png_array(i2i.json()["images"][0]).shape == png_array(init).shape
    assert i2i.json()["images"][0] != init
    m = post(server.url, "/retom/v1/generate", {**body, "merge_map": {"step": 1}}).json()
    assert png_array(m["merge_map"]).shape[1] > png_array(m["images"][0]).shape[1]


def test_load_on_loopback(server):
    """300 requests from 32 concurrent clients: every one answered once, with its own
    seed; the figures are printed (pytest -s) and documented in docs/serve.md."""
    server.app.state.engine.warmup()  # buckets 1 and 4 at STEPS compiled (if not yet)
    out = load_test(server.url, requests=300, clients=32, steps=STEPS, time_limit=240)
    print(json.dumps(out))
    assert out["errors"] == [] and out["lost"] == 0 and out["wrong_or_twice"] == []
    assert out["answered"] == 300 and out["server_answered"] == 300


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(tmp_path):
    port = __import__("retom_jax.serve.run", fromlist=["free_port"]).free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retom_jax", "serve", "--model", "demo", "--port", str(port),
         "--steps", "2", "--no-warmup", "--buckets", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            # the first request compiles: seconds in flight
            fut = ex.submit(post, url, "/sdapi/v1/txt2img", {"prompt": PROMPTS[0], "steps": 4})
            for _ in range(300):
                if httpx.get(url + "/health").json()["calls"] >= 1:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            r = fut.result(timeout=240)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        with pytest.raises(httpx.TransportError):
            httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x"}, timeout=5)
        # uvicorn re-raises the signal once it has shut down cleanly
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate()[0]
    assert "Waiting for application shutdown" in log and "Finished server process" in log, \
        log[-2000:]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install -y "
                           "chromium chromium-driver)")
def test_web_page_in_headless_chromium(server, tmp_path):
    """Type a prompt, press Generate: the image appears, equal to the API's image for the
    same settings, beside its unmerged twin."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1100,700", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 30).until(
            lambda d: "demo" in d.find_element(By.ID, "model").text)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPTS[2])
        Select(driver.find_element(By.ID, "method")).select_by_value("retom")
        for name, value in (("seed", "7"), ("steps", "2"), ("ratio", "0.5")):
            box = driver.find_element(By.ID, name)
            box.clear()
            box.send_keys(value)
        if os.environ.get("RETOM_SERVE_TEST_MAP") != "1":  # the map compiles a probe (slow)
            driver.find_element(By.ID, "showmap").click()
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 240).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(("done", "the ", "no ",
                                                                       "HTTP")))
        assert driver.find_element(By.ID, "status").text.startswith("done"), \
            driver.find_element(By.ID, "status").text
        src = driver.find_element(By.ID, "merged").get_attribute("src")
        twin = driver.find_element(By.ID, "unmerged").get_attribute("src")
        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("RETOM_SERVE_SCREENSHOT"):
            driver.save_screenshot(os.environ["RETOM_SERVE_SCREENSHOT"])
    finally:
        driver.quit()
    api = post(server.url, "/retom/v1/generate",
               {"prompt": PROMPTS[2], "seed": 7, "steps": 2,
                "merge": {"method": "retom", "ratio": 0.5}}).json()
    assert src == "data:image/png;base64," + api["images"][0]
    plain = post(server.url, "/retom/v1/generate",
                 {"prompt": PROMPTS[2], "seed": 7, "steps": 2}).json()
    assert twin == "data:image/png;base64," + plain["images"][0]
