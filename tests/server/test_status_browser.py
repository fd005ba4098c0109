"""The status page in a real browser (headless Chromium through chromium-driver): three real
servers, each with the other two as peers; after a sync every page shows the same state root
and checkpoint id; a contribution made at one site then appears on the other sites' pages
with no sync run by anyone (push on write; anti-entropy's timer is an hour away).

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them). Without
them the test is skipped, except under CI, where it fails.

``CRDT_MERGE_SCREENSHOT=docs/status-page.png pytest tests/server/test_status_browser.py``
also saves the screenshot the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from http_helpers import ServerProcess, join, new_project, put_model, wait_for
from operator_helpers import parse, total

from crdt_merge.sync import LocalPeer, sync
from crdt_merge.sync.http import HttpPeer
from crdt_merge_server.main import bind

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium and chromium-driver (make test installs them)")
    pytest.skip("chromium and chromium-driver are not installed (make test installs them)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

SITES = ("alpha", "beta", "gamma")
TOKENS = {s: f"{s}-browser-token-0123456789abcdef" for s in SITES}
ROLES = {"alpha": "admin", "beta": "contribute", "gamma": "contribute"}
XSS = '<script>alert("label")</script><img src=x onerror="alert(2)">'
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1080")


def free_ports(n: int) -> list[int]:
    socks = [bind("127.0.0.1", 0) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Network.enable", {})
    yield driver
    driver.quit()


def open_page(driver, url: str, token: str, query: str = "") -> dict[str, str]:
    """Load the page with the site's token (the same Bearer rule as the JSON routes);
    return what it shows."""
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                           {"headers": {"Authorization": f"Bearer {token}"}})
    driver.get(url + "/" + query)
    return {
        "state_root": driver.find_element(By.ID, "state-root").text,
        "checkpoint_id": driver.find_element(By.ID, "checkpoint-id").text,
        "labels": [e.text for e in driver.find_elements(By.CSS_SELECTOR, "span.label")],
    }


def test_three_pages_agree_and_a_write_reaches_the_others_by_push(tmp_path, browser):
    root = tmp_path / "sites"
    alpha = new_project(root / "alpha")
    replicas = {"alpha": alpha}
    for name in SITES[1:]:
        replicas[name] = join(root / name, alpha.genesis_bytes(), name)
        alpha.admit(name, replicas[name].public_key)
    for name in SITES[1:]:
        sync(replicas[name], LocalPeer(alpha))  # learn the admits
    for seed, name in enumerate(SITES):
        r = replicas[name]
        r.contribute(put_model(r, seed), params={"weight": "1"},
                     label=XSS if name == "beta" else f"model-of-{name}", family="test")
    alpha.set_recipe("linear", {})

    (root / "tokens").write_text("".join(f"{s} {ROLES[s]} {TOKENS[s]}\n" for s in SITES))
    ports = dict(zip(SITES, free_ports(3), strict=True))
    url = {s: f"http://127.0.0.1:{ports[s]}" for s in SITES}
    servers = {}
    for s in SITES:
        (root / f"{s}.peer-token").write_text(TOKENS[s])
        peers = [arg for other in SITES if other != s for arg in ("--peer", url[other])]
        servers[s] = ServerProcess(
            replicas[s].path, "--token-file", str(root / "tokens"), "--peer-token-file",
            str(root / f"{s}.peer-token"), "--sync-interval", "3600", *peers, port=ports[s],
            env={"CRDT_MERGE_WATCH_INTERVAL": "0.25", "CRDT_MERGE_NOTICE_INTERVAL": "0.25"})
    try:
        for s in SITES:
            servers[s].wait_ready()
        # a sync: alpha's directory with the other two servers, as a star
        for other in ("beta", "gamma", "beta"):
            with HttpPeer(url[other], TOKENS["alpha"]) as peer:
                assert not sync(alpha, peer).rejected

        def served_roots() -> set[str]:
            roots = set()
            for s in SITES:
                with HttpPeer(url[s], TOKENS[s]) as peer:
                    roots.add(peer.state().state_root)
            return roots

        assert wait_for(lambda: served_roots() == {alpha.state_root()}, timeout=30)
        pages = {s: open_page(browser, url[s], TOKENS[s], "?resolve=1") for s in SITES}
        with HttpPeer(url["gamma"], TOKENS["gamma"]) as peer:
            checkpoint = peer.checkpoint()
        assert re.fullmatch(r"[0-9a-f]{64}", checkpoint["checkpoint_id"] or ""), checkpoint
        for s in SITES:
            assert pages[s]["state_root"] == alpha.state_root(), (s, pages[s])
            assert pages[s]["checkpoint_id"] == checkpoint["checkpoint_id"], (s, pages[s])
            # beta's label is markup: the browser shows it as text, runs nothing
            assert XSS in pages[s]["labels"], pages[s]["labels"]
        assert browser.find_elements(By.TAG_NAME, "script") == []
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018
        if os.environ.get("CRDT_MERGE_SCREENSHOT"):
            open_page(browser, url["alpha"], TOKENS["alpha"])
            Path(os.environ["CRDT_MERGE_SCREENSHOT"]).write_bytes(
                browser.get_screenshot_as_png())

        # push on write: gamma contributes in its own directory (as the CLI would); its
        # server notices the new root and tells alpha's and beta's, which pull
        gamma = replicas["gamma"]
        gamma.contribute(put_model(gamma, 7), params={"weight": "1"}, label="pushed-by-gamma",
                         family="test")
        for s in ("alpha", "beta"):
            assert wait_for(lambda s=s: "pushed-by-gamma" in open_page(
                browser, url[s], TOKENS[s])["labels"], timeout=30, every=0.5), s
            assert open_page(browser, url[s], TOKENS[s])["state_root"] == gamma.state_root()
            samples = parse(httpx.get(url[s] + "/metrics", headers={
                "Authorization": f"Bearer {TOKENS[s]}"}).text)
            assert total(samples, "crdt_merge_sync_rounds_total", trigger="timer") == 0
            assert total(samples, "crdt_merge_sync_rounds_total", trigger="notice") >= 1
    finally:
        for server in servers.values():
            server.stop()
        for r in replicas.values():
            r.close()
