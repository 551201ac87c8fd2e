"""Bypass rules, and the PAC file generated from them, run in a real JavaScript engine (node).

The PAC script is evaluated in a bare ``vm`` context (no PAC helpers, no node globals), as a
browser's PAC sandbox would, and must route every host exactly as the agent's own matcher.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desktop.bypass import DEFAULT_BYPASS, BypassRuleError, BypassRules, PatternKind, Route, parse_pattern
from desktop.pac import PAC_PATH, pac_url, proxy_directive, render_pac

NODE = shutil.which("node") or shutil.which("nodejs")

#: Reads {"pac": text, "hosts": [...]} on stdin and prints FindProxyForURL for each host.
RUNNER = r"""
const vm = require("vm");
let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const job = JSON.parse(input);
  const sandbox = vm.createContext({});
  vm.runInContext(job.pac, sandbox, { timeout: 5000 });
  const results = job.hosts.map((host) =>
    vm.runInContext("FindProxyForURL(" + JSON.stringify("http://" + host + "/") + ", " +
      JSON.stringify(host) + ")", sandbox, { timeout: 1000 }));
  process.stdout.write(JSON.stringify(results));
});
"""

RULES = BypassRules.parse(
    [*DEFAULT_BYPASS, "*.corp.example", ".lan", "exact.example", "fd00::/8", "203.0.113.7", "100.64.0.0/10"]
)
PROXY = "PROXY 127.0.0.1:8080; SOCKS5 127.0.0.1:8080"

#: host -> where it must go with RULES.
TABLE = {
    "localhost": Route.DIRECT,
    "LOCALHOST.": Route.DIRECT,
    "printer": Route.DIRECT,  # <local>
    "nas.lan": Route.DIRECT,
    "lan": Route.DIRECT,
    "a.b.lan": Route.DIRECT,
    "planet": Route.DIRECT,  # <local>: no dot
    "planet.com": Route.TUNNEL,
    "wiki.corp.example": Route.DIRECT,
    "corp.example": Route.TUNNEL,  # *.corp.example is only what is under it
    "notcorp.example": Route.TUNNEL,
    "exact.example": Route.DIRECT,
    "www.exact.example": Route.TUNNEL,
    "example.com": Route.TUNNEL,
    "www.example.com": Route.TUNNEL,
    "127.0.0.1": Route.DIRECT,
    "127.255.0.9": Route.DIRECT,
    "10.1.2.3": Route.DIRECT,
    "172.16.0.1": Route.DIRECT,
    "172.31.255.255": Route.DIRECT,
    "172.32.0.1": Route.TUNNEL,
    "192.168.1.20": Route.DIRECT,
    "192.169.1.20": Route.TUNNEL,
    "169.254.169.254": Route.DIRECT,
    "100.64.1.1": Route.DIRECT,
    "100.128.0.1": Route.TUNNEL,
    "203.0.113.7": Route.DIRECT,
    "203.0.113.8": Route.TUNNEL,
    "8.8.8.8": Route.TUNNEL,
    "010.1.2.3": Route.TUNNEL,  # not an IP literal (leading zero): a name, with dots
    "::1": Route.DIRECT,
    "[::1]": Route.DIRECT,
    "fe80::1": Route.DIRECT,
    "fe80::1%eth0": Route.DIRECT,
    "fd12:3456::1": Route.DIRECT,
    "fc00::1": Route.DIRECT,
    "2001:db8::1": Route.TUNNEL,
    "[2606:4700::1111]": Route.TUNNEL,
    "::ffff:192.168.0.1": Route.DIRECT,  # IPv4-mapped: the IPv4 rules apply
    "::ffff:8.8.8.8": Route.TUNNEL,
    "1::2:3:4:5:6:7:8": Route.DIRECT,  # not a valid IPv6 literal: a plain name without a dot
    "": Route.TUNNEL,
}


def run_pac(pac: str, hosts: list[str]) -> list[str]:
    if NODE is None:
        pytest.skip("node is not installed: run .ci/install-display-deps.sh")
    result = subprocess.run(
        [NODE, "-e", RUNNER],
        input=json.dumps({"pac": pac, "hosts": hosts}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert isinstance(answers, list)
    return [str(answer) for answer in answers]


def test_the_matcher_routes_the_table() -> None:
    wrong = {host: RULES.route(host) for host, route in TABLE.items() if RULES.route(host) is not route}
    assert not wrong


def test_the_pac_file_routes_the_table_in_node() -> None:
    pac = render_pac(RULES, "127.0.0.1", 8080)
    answers = dict(zip(TABLE, run_pac(pac, list(TABLE)), strict=True))
    expected = {host: "DIRECT" if route is Route.DIRECT else PROXY for host, route in TABLE.items()}
    assert answers == expected


def test_no_silent_direct_fallback_unless_asked() -> None:
    assert proxy_directive("127.0.0.1", 8080) == PROXY
    assert "DIRECT" not in proxy_directive("127.0.0.1", 8080)
    pac = render_pac(RULES, "127.0.0.1", 9090, fallback_direct=True)
    assert run_pac(pac, ["example.com", "nas.lan"]) == [
        "PROXY 127.0.0.1:9090; SOCKS5 127.0.0.1:9090; DIRECT",
        "DIRECT",
    ]
    assert proxy_directive("::1", 8080) == "PROXY [::1]:8080; SOCKS5 [::1]:8080"
    assert pac_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/proxy.pac" and PAC_PATH == "/proxy.pac"


def test_an_empty_list_tunnels_everything() -> None:
    empty = BypassRules.parse([])
    hosts = ["localhost", "printer", "127.0.0.1", "::1", "192.168.1.1"]
    assert all(empty.route(host) is Route.TUNNEL for host in hosts)
    assert run_pac(render_pac(empty, "127.0.0.1", 8080), hosts) == [PROXY] * len(hosts)


def test_the_pac_file_never_resolves_names() -> None:
    pac = render_pac(RULES, "127.0.0.1", 8080)
    for helper in ("dnsResolve", "isInNet", "isResolvable", "myIpAddress"):
        assert helper not in pac


def test_patterns_parse_to_their_kinds_and_bad_ones_say_why() -> None:
    assert parse_pattern("*.Corp.Example.").kind is PatternKind.SUBDOMAINS
    assert parse_pattern(".lan").text == ".lan"
    assert parse_pattern("<LOCAL>").kind is PatternKind.LOCAL
    assert parse_pattern("192.168.1.7/24").text == "192.168.1.0/24"
    assert parse_pattern("10.1.2.3").text == "10.1.2.3/32"
    assert parse_pattern("[::1]").text == "::1/128"
    for bad, hint in {
        "192.168.*": "network",
        "a..b": "label",
        "exa mple.com": "label",
        "999.1.1.1": "IP address",
        "fd00::/200": "network",
        "bücher.example": "punycode",
        "": "host name",
        "example.com:80": "IP address",
    }.items():
        with pytest.raises(BypassRuleError, match=hint):
            parse_pattern(bad)
    assert BypassRules.parse(["localhost", "LOCALHOST"]).texts == ("localhost",)


# ----------------------------------------------------------------------------- PAC vs matcher, fuzzed

labels = st.sampled_from(["lan", "corp", "example", "exact", "www", "a", "localhost", "printer", "x-1"])
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: a.compressed),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["10.0.0.1", "172.20.1.1", "fe80::abcd", "fd00::5", "127.0.0.53", "100.100.100.100"]),
)
scribbles = st.text(alphabet="0123456789abcdef:.%[]", max_size=24)
host_strategy = st.one_of(
    names, names.map(str.upper), addresses, addresses.map(lambda a: f"[{a}]"), scribbles
)


@settings(max_examples=10, deadline=None)
@given(hosts=st.lists(host_strategy, min_size=50, max_size=150))
def test_the_pac_file_agrees_with_the_matcher_on_random_hosts(hosts: list[str]) -> None:
    pac = render_pac(RULES, "127.0.0.1", 8080)
    expected = ["DIRECT" if RULES.route(host) is Route.DIRECT else PROXY for host in hosts]
    assert run_pac(pac, hosts) == expected


def test_the_generated_pac_file_is_stable(tmp_path: Path) -> None:
    first = render_pac(BypassRules.default(), "127.0.0.1", 8080)
    assert first == render_pac(BypassRules.default(), "127.0.0.1", 8080)
    assert first.count("function FindProxyForURL(url, host)") == 1
