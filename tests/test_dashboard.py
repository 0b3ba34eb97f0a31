"""The operator's dashboard over HTTP: what each panel says, bad input, tokens, TLS client certificates.

The pages in a real browser: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl

import httpx
import pytest

from server.__main__ import main as server_main
from server.dashboard.command import running_dashboard
from server.dashboard.pages import run_page
from server.dashboard.rounds_view import round_views, site_views
from server.dashboard.run_status import GRACE_SECONDS
from server.dashboard.security import TlsFiles, check_exposure
from shared.errors import ConfigError
from tests.dashboard_runs import REFUSAL, close_round, finished_run, folder_state, start_run

TOKEN = "s3cret-token-for-the-dashboard-tests"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """A runs folder with one finished run (``done``) and one with a single round (``going``)."""
    root = tmp_path_factory.mktemp("runs")
    finished_run(root / "done")
    close_round(start_run(root / "going"), 1)
    return root


def get_state(client: httpx.Client, run_id: str) -> dict:
    response = client.get(f"/api/runs/{run_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_finished_run_shows_rounds_sites_plan_baselines_model_and_checkpoint(runs):
    before = folder_state(runs)
    with running_dashboard(runs=runs) as url, httpx.Client(base_url=url) as client:
        index = client.get("/api/runs").json()["panels"]["runs"]
        state = get_state(client, "done")
        page = client.get("/runs/done")
        report = client.get("/runs/done/files/report.html")
        model = client.get("/runs/done/files/global_model.pt")
    assert "done" in index and "finished" in index and "going" in index and "running" in index
    panels = state["panels"]
    assert "finished" in panels["status"] and page.status_code == 200 and "<script src=\"/vendor/plotly.min.js\">" in page.text
    assert 'id="round-2"' in panels["rounds"] and REFUSAL in panels["rounds"]
    assert "hospital-03" in panels["sites"] and "refused (train), refused (evaluate)" in panels["sites"]
    assert "4.00 / 8.00" in panels["sites"]  # epsilon spent against the budget from plan.json
    assert "0.700" in panels["baselines"] and "[0.500, 0.700]" in panels["baselines"]
    assert "DP outlook" in panels["plan"] and REFUSAL in panels["plan"] and "median image" in panels["plan"]
    assert hashlib.sha256(model.content).hexdigest() in panels["artifacts"]
    assert "final model, after round 2" in panels["artifacts"] and "continues at round 3" in panels["artifacts"]
    assert report.status_code == 200 and "fedseg run report" in report.text
    assert model.headers["content-disposition"].endswith('filename="done-global_model.pt"')
    assert {"global-dice", "dice-class-1", "hd95-class-1", "epsilon", "round-seconds"} <= set(state["figures"])
    assert "Dice, class 1 (lesion)" in str(state["figures"]["dice-class-1"]["layout"]["title"])
    assert folder_state(runs) == before  # read-only


def test_a_poll_without_changes_is_answered_unchanged(runs):
    with running_dashboard(runs=runs) as url, httpx.Client(base_url=url) as client:
        signature = get_state(client, "done")["signature"]
        again = client.get("/api/runs/done", params={"since": signature}).json()
    assert again == {"signature": signature, "unchanged": True}


def test_truncated_metrics_line_and_missing_files_show_what_is_there(runs, tmp_path):
    run = tmp_path / "runs" / "broken"
    shutil.copytree(runs / "done", run)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 40])  # the last line cut mid-write
    last_line = len(text.splitlines())
    (run / "plan.json").unlink()
    (run / "checkpoint.ckpt").write_bytes((run / "checkpoint.ckpt").read_bytes()[:200])
    with running_dashboard(runs=tmp_path / "runs") as url, httpx.Client(base_url=url) as client:
        responses = [client.get(path) for path in ("/", "/api/runs", "/runs/broken", "/api/runs/broken")]
    assert all(r.status_code == 200 for r in responses)
    assert not any("Traceback" in r.text for r in responses)
    status = responses[3].json()["panels"]["status"]
    assert f"metrics.jsonl line {last_line} is not valid JSON" in status and "incomplete" in status
    assert "plan.json is missing" in status and "checkpoint.ckpt cannot be read" in status and "truncated" in status
    assert 'id="round-1"' in responses[3].json()["panels"]["rounds"]  # the readable rows are still shown


def test_an_empty_runs_folder_and_an_unknown_run(tmp_path):
    with running_dashboard(runs=tmp_path / "nothing-here") as url, httpx.Client(base_url=url) as client:
        index = client.get("/")
        unknown = client.get("/runs/nope")
        escape = client.get("/runs/done/files/..%2F..%2Fetc%2Fpasswd")
    assert index.status_code == 200 and "No run folders" in index.text
    assert unknown.status_code == 404 and escape.status_code == 404


def test_only_the_run_files_on_the_list_are_served(runs):
    with running_dashboard(runs=runs) as url, httpx.Client(base_url=url) as client:
        assert client.get("/runs/done/files/summary.json").status_code == 200
        assert client.get("/runs/done/files/checkpoint.ckpt").status_code == 404
        assert client.get("/runs/done/files/../going/plan.json").status_code == 404
        assert client.get("/runs/latest").status_code == 404  # no `latest` link in this runs folder


def test_rounds_and_sites_count_every_outcome():
    rows = [
        {"round": 1, "site": "a", "train-status": "ok", "evaluate-status": "ok", "dice": 0.5, "epsilon": 3.0,
         "epsilon-round": 1.0},
        {"round": 1, "site": "b", "train-status": "failed", "train-reason": "no reply within round-timeout (60 s)"},
        {"round": 1, "site": "c", "train-status": "rejected", "train-reason": "NaN in weights",
         "evaluate-status": "refused", "evaluate-reason": "busy"},
        {"round": 1, "site": "d", "train-status": "ok", "update-scale": 0.5, "train-note": "scaled to the bound"},
        {"round": 1, "site": "global", "dice": 0.5, "round-seconds": 3.0, "ended-at": 100.0},
    ]
    (view,) = round_views(rows)
    assert (view.sampled, view.answered, view.trained, view.evaluated) == (4, 3, 2, 1)
    assert view.outcomes["timed out"] == ["b (train): no reply within round-timeout (60 s)"]
    assert view.outcomes["rejected"] == ["c (train): NaN in weights"] and view.outcomes["refused"] == [
        "c (evaluate): busy"]
    assert view.bounded == ["d: scaled to the bound"] and view.seconds == 3.0
    plan_sites = {"a": {"status": "ok", "dp": {"epsilon": 5.0}}, "e": {"status": "refused", "reason": "no data"}}
    sites = {s.site: s for s in site_views(rows, plan_sites=plan_sites)}
    assert sites["b"].status == "timed out (train)" and sites["b"].last_contact is None
    assert sites["a"].last_contact == 100.0 and sites["a"].budget == 7.0  # 5 left at plan time + 2 spent before
    assert sites["e"].status == "fingerprint refused" and sites["e"].reason == "no data"


def test_a_run_silent_for_longer_than_a_round_can_take_is_failed(runs):
    going = runs / "going"
    last = max(f.stat().st_mtime for f in going.iterdir())
    timeout = 3600.0
    assert run_page(going, now=last + 60).status.state == "running"
    stale = run_page(going, now=last + 2 * timeout + GRACE_SECONDS + 1).status
    assert stale.state == "failed" and "summary.json" in stale.detail


def test_a_token_is_needed_on_every_path_and_a_wrong_one_gets_401(runs):
    with running_dashboard(runs=runs, token=TOKEN) as url, httpx.Client(base_url=url) as client:
        for path in ("/", "/api/runs", "/runs/done", "/static/dashboard.js", "/vendor/plotly.min.js",
                     "/runs/done/files/global_model.pt"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong-token-1234567"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        first = client.get("/runs/done", params={"token": TOKEN})
        assert first.status_code == 303 and first.headers["location"].endswith("/runs/done")
        assert "httponly" in first.headers["set-cookie"].lower()
        assert client.get("/runs/done").status_code == 200  # the cookie from the first visit


def test_binding_off_loopback_needs_a_token_or_client_certificates(tmp_path, capsys):
    check_exposure(host="127.0.0.1", token=None, tls=None)
    check_exposure(host="::1", token=None, tls=None)
    check_exposure(host="0.0.0.0", token=TOKEN, tls=None)
    check_exposure(host="10.1.2.3", token=None, tls=TlsFiles(tmp_path / "c", tmp_path / "k", tmp_path / "ca"))
    with pytest.raises(ConfigError, match="not loopback"):
        check_exposure(host="0.0.0.0", token=None, tls=TlsFiles(tmp_path / "c", tmp_path / "k"))
    with pytest.raises(ConfigError, match="at least 16"):
        check_exposure(host="127.0.0.1", token="short", tls=None)
    assert server_main(["dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 1
    assert "not loopback" in capsys.readouterr().err


def test_tls_with_client_certificates_from_server_certs(runs, tmp_path):
    certs = tmp_path / "certs"
    assert server_main(["certs", "--out", str(certs), "--host", "127.0.0.1", "--client", "operator"]) == 0
    tls = TlsFiles(certs / "server.pem", certs / "server.key", certs / "ca.crt")
    with running_dashboard(runs=runs, tls=tls) as url:
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=certs / "ca.crt")
        with_cert = ssl.create_default_context(cafile=certs / "ca.crt")
        with_cert.load_cert_chain(certs / "client-operator.pem", certs / "client-operator.key")
        assert httpx.get(url + "api/runs", verify=with_cert).status_code == 200
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(url + "api/runs", verify=trusted)  # no client certificate: the handshake fails
    assert (certs / "client-operator.p12").stat().st_mode & 0o777 == 0o600


def test_a_site_cannot_put_markup_into_the_operators_page(tmp_path):
    recorder = start_run(tmp_path / "runs" / "x")
    close_round(recorder, 1, refusal='<img src=x onerror="alert(1)">')
    with running_dashboard(runs=tmp_path / "runs") as url, httpx.Client(base_url=url) as client:
        panels = get_state(client, "x")["panels"]
    assert "&lt;img src=x onerror=" in panels["rounds"] and "<img" not in panels["rounds"] + panels["sites"]


def test_non_finite_numbers_in_metrics_do_not_break_the_page(tmp_path):
    run = tmp_path / "runs" / "nan"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"round": 1, "site": "a", "dice": NaN, "hd95": Infinity, "train-status": "ok"}\n'
                                       '{"round": 1, "site": "global", "dice": NaN, "ended-at": 1.0}\n')
    with running_dashboard(runs=tmp_path / "runs") as url, httpx.Client(base_url=url) as client:
        state = get_state(client, "nan")
    assert 'id="round-1"' in state["panels"]["rounds"] and "plan.json is missing" in state["panels"]["status"]
