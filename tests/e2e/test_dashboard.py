"""The dashboard in a real headless browser: Debian's Chromium driven by Playwright.

One server (the real process, tokens configured: an admin and a read token) and
one browser for the module; each test has its own browser context (cookies),
signed in through the login form as a user would. Changes are made and checked
over KCP, the other front end, so that what the page shows is the server's
state and not the page's own. Screenshots go to tests/artifacts/dashboard/
(ignored by git; the path is printed).

Skipped when /usr/bin/chromium is missing (scripts/test.sh installs it through
scripts/chromium.sh) or Playwright is not installed (the test extras).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.kcp_client import KcpClient
from support.server import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
ADMIN = "dash-admin-token"
READER = "dash-read-token"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
TIMEOUT_MS = 15_000  # a loaded 2-core machine: pages answer in ms, the browser may lag

playwright_sync = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (scripts/chromium.sh installs it)", allow_module_level=True)

# The machine's network is closed: without these, Chromium tries to reach Google's
# services at start (and waits on them).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = f"""
[auth]
tokens = ["{ADMIN}"]
read_tokens = ["{READER}"]
"""
    workdir = tmp_path_factory.mktemp("dashboard")
    process = ServerProcess(workdir / "server", config).start()
    process.ok_script = workdir / "ok.sh"  # type: ignore[attr-defined]
    process.ok_script.write_text("exit 0\n")  # type: ignore[attr-defined]
    yield process
    process.stop()


@pytest.fixture(scope="module")
def base_url(server: ServerProcess) -> str:
    port = server.events("ready")[0]["http_port"]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots: {ARTIFACTS}")
    with playwright_sync.sync_playwright() as p:
        # Playwright's own browser download is never used: Debian's binary.
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def kcp_as_admin(server: ServerProcess) -> KcpClient:
    client = KcpClient(server.kcp_port)
    assert client.request("AUTH", ADMIN) == ["OK"]
    return client


def signed_in(browser, base_url: str, token: str, *, width: int = 1280):
    """A new browser context (its own cookies) signed in with `token` through the form,
    and its page on the overview."""
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=base_url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto("/")
    assert "/login" in page.url  # tokens are configured: pages need one
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base_url + "/")
    return context, page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_sign_in_refuses_an_unknown_token(browser, base_url: str) -> None:
    context = browser.new_context(base_url=base_url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto("/jobs")
    page.get_by_label("Token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    playwright_sync.expect(page.get_by_role("alert")).to_contain_text("not configured")
    assert page.locator("table.jobs").count() == 0
    context.close()


def test_overview_shows_jobs_by_status_and_charts(browser, base_url, server) -> None:
    with kcp_as_admin(server) as kcp:
        script = str(server.ok_script)  # type: ignore[attr-defined]
        assert kcp.request("RULE", "SET", "ov", "ov.", "shell", script) == ["OK"]
        for n in range(3):
            assert kcp.request("SET", f"ov.future.{n}", "2099-01-01 00:00:00") == ["OK"]
        assert kcp.request("SET", "ov.past", "2000-01-01 00:00:00") == ["OK"]
        wait_status(kcp, "ov.past", "executed")
    context, page = signed_in(browser, base_url, ADMIN)
    planned = page.locator('tr[data-status="planned"] td')
    executed = page.locator('tr[data-status="executed"] td')
    assert int(planned.inner_text().replace(",", "")) >= 3
    assert int(executed.inner_text().replace(",", "")) >= 1
    # One chart per rate and lateness, each labelled in words for screen readers.
    charts = page.locator("svg.chart[role=img]")
    assert charts.count() == 5
    label = page.locator("svg.chart.set").get_attribute("aria-label") or ""
    match = re.search(r"total ([\d,]+)", label)
    assert match and int(match.group(1).replace(",", "")) >= 4, label
    assert page.locator("svg.chart.set rect").count() >= 1
    playwright_sync.expect(page.get_by_role("heading", name="Runners")).to_be_visible()
    assert page.get_by_role("row", name=re.compile(r"^shell")).count() == 1
    playwright_sync.expect(page.locator("#storage ~ dl")).to_contain_text("log")
    shot(page, "overview-wide")
    page.set_viewport_size({"width": 375, "height": 800})
    # A phone's width: nothing wider than the screen.
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= 375, scroll
    shot(page, "overview-375px")
    context.close()


def test_jobs_filter_by_prefix_and_open_a_job(browser, base_url, server) -> None:
    with kcp_as_admin(server) as kcp:
        assert kcp.request("RULE", "SET", "shop", "shop.", "shell", "/bin/true") == ["OK"]
        for job_id in ("shop.1", "shop.2", "mail.1"):
            assert kcp.request("SET", job_id, "2099-01-01 00:00:00", "<script>x()</script>") == [
                "OK"
            ]
    context, page = signed_in(browser, base_url, ADMIN)
    page.get_by_role("link", name="Jobs").click()
    page.get_by_label("Id prefix").fill("shop.")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"prefix=shop\."))
    assert page.locator("a.job-link").all_inner_texts() == ["shop.1", "shop.2"]
    shot(page, "jobs-filtered")
    page.get_by_role("link", name="shop.2", exact=True).click()
    playwright_sync.expect(page.locator("#job-id")).to_have_text("shop.2")
    playwright_sync.expect(page.locator("#job-status")).to_have_text("planned")
    # The payload is shown as text, escaped: no element was made of it.
    playwright_sync.expect(page.locator("pre.payload")).to_have_text("<script>x()</script>")
    assert page.locator("main script").count() == 0
    playwright_sync.expect(page.locator("#job-rule")).to_have_text("shop")
    shot(page, "job")
    context.close()


def test_delete_a_job_with_confirmation_and_it_is_gone_over_kcp(browser, base_url, server) -> None:
    with kcp_as_admin(server) as kcp:
        assert kcp.request("SET", "del.me", "2099-01-01 00:00:00") == ["OK"]
        context, page = signed_in(browser, base_url, ADMIN)
        page.goto("/job?id=del.me")
        page.get_by_role("button", name="Delete").click()
        playwright_sync.expect(page.locator("#question")).to_contain_text("Delete job del.me")
        assert kcp.request("GET", "del.me")[0] == "OK"  # nothing happens before the answer
        shot(page, "confirm-delete")
        page.get_by_role("button", name="Yes, delete").click()
        playwright_sync.expect(page.get_by_role("status")).to_contain_text("del.me deleted")
        assert kcp.request("GET", "del.me")[0] != "OK"
    context.close()


def test_replan_a_job_at_a_time(browser, base_url, server) -> None:
    with kcp_as_admin(server) as kcp:
        assert kcp.request("SET", "re.plan", "2099-01-01 00:00:00", "kept") == ["OK"]
        context, page = signed_in(browser, base_url, ADMIN)
        page.goto("/job?id=re.plan")
        page.get_by_label("Re-plan at (UTC)").fill("2098-05-06T07:08:09")
        page.get_by_role("button", name="Re-plan").click()
        page.get_by_role("button", name="Yes, re-plan").click()
        playwright_sync.expect(page.get_by_role("status")).to_contain_text("re-planned")
        answer = kcp.request("GET", "re.plan")
        assert answer[:2] == ["OK", "planned"] and answer[2].startswith("2098-05-06 07:08:09")
    context.close()


def test_pause_resume_a_recurring_job_and_page_back(browser, base_url, server) -> None:
    with kcp_as_admin(server) as kcp:
        assert kcp.request("SCHEDULE", "rec.1", "every 1h")[0] == "OK"
        for n in range(3):
            assert kcp.request("SET", f"pg.{n}", "2099-01-01 00:00:00") == ["OK"]
    api = httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {ADMIN}"})

    def paused() -> bool:
        answer = api.get("/api/v1/jobs/rec.1")
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["schedule"]["paused"])

    context, page = signed_in(browser, base_url, ADMIN)
    page.goto("/job?id=rec.1")
    page.get_by_role("button", name="Pause").click()  # undone by Resume: no question
    playwright_sync.expect(page.get_by_role("status")).to_contain_text("paused")
    assert paused()
    shot(page, "job-paused")
    page.get_by_role("button", name="Resume").click()
    playwright_sync.expect(page.get_by_role("status")).to_contain_text("resumed")
    assert not paused()
    api.close()
    # A page at a time, forwards and back again.
    page.goto("/jobs?prefix=pg.&page_size=1")
    links = page.locator("a.job-link")
    assert page.locator("#previous-page").count() == 0
    page.locator("#next-page").click()
    page.locator("#next-page").click()
    playwright_sync.expect(links).to_have_text(["pg.2"])
    assert page.locator("#next-page").count() == 0
    page.locator("#previous-page").click()
    playwright_sync.expect(links).to_have_text(["pg.1"])
    page.locator("#previous-page").click()
    playwright_sync.expect(links).to_have_text(["pg.0"])
    assert page.locator("#previous-page").count() == 0
    context.close()


def test_live_event_appears_when_a_job_is_set_over_kcp(browser, base_url, server) -> None:
    context, page = signed_in(browser, base_url, ADMIN)
    page.get_by_role("link", name="Live events").click()
    page.get_by_label("Job id prefix").fill("live.")
    page.get_by_role("button", name="Watch").click()
    playwright_sync.expect(page.locator("#events")).to_have_attribute("data-ready", "true")
    assert page.locator("#events").get_attribute("aria-live") == "polite"
    with kcp_as_admin(server) as kcp:
        assert kcp.request("SET", "other.1", "2099-01-01 00:00:00") == ["OK"]
        assert kcp.request("SET", "live.1", "2099-01-01 00:00:00") == ["OK"]
        item = page.locator('#events li[data-id="live.1"]')
        playwright_sync.expect(item).to_contain_text("planned")
        # Paused: a change is held, not shown, until resumed.
        page.get_by_role("button", name="Pause").click()
        assert kcp.request("SET", "live.2", "2099-01-01 00:00:00") == ["OK"]
        playwright_sync.expect(page.locator("#event-state")).to_contain_text("1 change(s) held")
        assert page.locator('#events li[data-id="live.2"]').count() == 0
        page.get_by_role("button", name="Resume").click()
        playwright_sync.expect(page.locator('#events li[data-id="live.2"]')).to_have_count(1)
    # Only the prefix watched: other.1 never came.
    assert page.locator('#events li[data-id="other.1"]').count() == 0
    shot(page, "live-events")
    context.close()


def test_read_only_token_sees_pages_without_actions(browser, base_url, server) -> None:
    with kcp_as_admin(server) as kcp:
        assert kcp.request("RULE", "SET", "ro", "ro.", "shell", "/bin/true") == ["OK"]
        assert kcp.request("SET", "ro.1", "2099-01-01 00:00:00") == ["OK"]
        assert kcp.request("SCHEDULE", "ro.every", "every 1h")[0] == "OK"
        context, page = signed_in(browser, base_url, READER)
        playwright_sync.expect(page.locator(".role")).to_have_text("read token")
        page.goto("/job?id=ro.every")  # recurring: would have Pause
        playwright_sync.expect(page.locator("#job-id")).to_have_text("ro.every")
        assert page.locator('form[action="/job/action"]').count() == 0
        page.goto("/job?id=ro.1")
        playwright_sync.expect(page.locator("#job-id")).to_have_text("ro.1")
        for name in ("Run now", "Re-plan", "Delete"):
            assert page.get_by_role("button", name=name).count() == 0, name
        assert page.locator('form[action="/job/action"]').count() == 0
        shot(page, "job-read-only")
        # Posting the action anyway (with the session's CSRF token) is refused.
        csrf = page.locator('form.signout input[name="csrf"]').get_attribute("value")
        answer = context.request.post(
            "/job/action", form={"id": "ro.1", "action": "delete", "csrf": csrf, "confirm": "yes"}
        )
        assert answer.status == 403
        assert kcp.request("GET", "ro.1")[0] == "OK"
        page.get_by_role("link", name="Rules").click()
        page.get_by_role("link", name="ro", exact=True).click()
        playwright_sync.expect(page.locator(".rule-jobs")).to_contain_text("ro.1")
        shot(page, "rule-read-only")
    context.close()


def wait_status(kcp: KcpClient, job_id: str, status: str) -> None:
    from support.waiting import wait_for

    wait_for(lambda: kcp.request("GET", job_id)[1] == status)
