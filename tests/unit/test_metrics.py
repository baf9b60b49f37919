"""The health endpoints say what an operator's probe needs to know."""
import urllib.error
import urllib.request

import pytest

from lib.cycle import Counts, CycleReport
from lib.metrics import Metrics, serve


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def ok_report():
    return CycleReport(ok=True, seconds={"fetch": 0.01, "apply": 0.02},
                       counts=Counts(policies=3, admin_policies=2, local_pods=5, rules=40, sets=4, set_members=17))


def failed_report(stage="fetch", error="connection refused"):
    return CycleReport(ok=False, seconds={"fetch": 3.0}, failed_stage=stage, error=error)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def served():
    clock = Clock()
    m = Metrics(interval=10, clock=clock)
    server = serve(m, 0, "127.0.0.1")
    yield m, clock, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_not_ready_until_first_success_then_ready(served):
    m, clock, url = served
    assert get(url + "/readyz")[0] == 503
    m.observe(ok_report())
    assert get(url + "/readyz") == (200, "ok\n")


def test_healthz_turns_503_after_three_intervals_without_success(served):
    m, clock, url = served
    m.observe(ok_report())
    clock.now += 29
    m.observe(failed_report())
    assert get(url + "/healthz")[0] == 200
    clock.now += 2
    code, text = get(url + "/healthz")
    assert code == 503
    assert "31s ago" in text and "fetch: connection refused" in text


def test_healthz_at_start_gives_grace_then_fails_without_success(served):
    m, clock, url = served
    assert get(url + "/healthz")[0] == 200
    m.observe(failed_report("read", "iptables-save failed"))
    clock.now += 31
    code, text = get(url + "/healthz")
    assert code == 503 and "iptables-save failed" in text


def test_metrics_expose_counts_errors_and_stage_times(served):
    m, clock, url = served
    m.observe(ok_report())
    m.observe(failed_report("read"))
    code, text = get(url + "/metrics")
    assert code == 200
    assert "kpm_rules 40.0" in text
    assert "kpm_ipset_members 17.0" in text
    assert "kpm_admin_policies 2.0" in text
    assert 'kpm_errors_total{stage="read"} 1.0' in text
    assert 'kpm_cycle_stage_seconds_count{stage="apply"} 1.0' in text
    assert "kpm_last_successful_sync_timestamp_seconds 1000.0" in text


def test_unknown_path_is_404(served):
    assert get(served[2] + "/nope")[0] == 404


def test_kernel_writes_are_counted_per_tool_on_both_dataplanes(served):
    from dataclasses import replace

    from lib.kernel import ApplyStats
    m, clock, url = served
    m.observe(replace(ok_report(), applied=True,
                      apply_stats=ApplyStats(processes=2, iptables_lines=7, ipset_lines=3)))
    m.observe(replace(ok_report(), applied=True, apply_stats=ApplyStats(processes=1, nft_lines=12)))
    m.observe(replace(ok_report(), applied=True, apply_stats=ApplyStats(processes=1, nft_lines=4)))
    text = get(url + "/metrics")[1]
    assert 'kpm_kernel_writes_total{tool="iptables"} 7.0' in text
    assert 'kpm_kernel_writes_total{tool="ipset"} 3.0' in text
    assert 'kpm_kernel_writes_total{tool="nft"} 16.0' in text
