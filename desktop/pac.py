"""The PAC file the agent serves at ``/proxy.pac``, generated from the bypass rules.

Browsers that use it send tunnelled traffic to the agent (HTTP first, then SOCKS5 on the
same port) and go DIRECT only for what ``bypass`` lists. The script uses no PAC helper
functions: ``isInNet`` and ``dnsResolve`` would resolve names locally, leaking every visited
name to the local network's DNS, so network rules are checked on IP literals only, by code
in the file itself. That also lets the tests run it in any JavaScript engine.

When the agent is down the browser cannot reach the proxy; by default it then fails instead
of quietly going DIRECT (``pac_fallback_direct: true`` allows the fallback).
"""

from __future__ import annotations

import ipaddress
import json

from desktop.bypass import BypassRules, PatternKind

PAC_PATH = "/proxy.pac"
PAC_CONTENT_TYPE = "application/x-ns-proxy-autoconfig"


def pac_url(host: str, port: int) -> str:
    """Where the agent serves the PAC file (what ``system_proxy: pac`` points the OS at)."""
    return f"http://{authority(host, port)}{PAC_PATH}"


def authority(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def proxy_directive(host: str, port: int, *, fallback_direct: bool = False) -> str:
    """What FindProxyForURL returns for tunnelled traffic."""
    where = authority(host, port)
    directive = f"PROXY {where}; SOCKS5 {where}"
    return f"{directive}; DIRECT" if fallback_direct else directive


def _v4_networks(rules: BypassRules) -> list[list[int]]:
    return [
        [int(network.network_address), network.prefixlen]
        for network in rules.networks
        if isinstance(network, ipaddress.IPv4Network)
    ]


def _v6_networks(rules: BypassRules) -> list[list[object]]:
    found: list[list[object]] = []
    for network in rules.networks:
        if isinstance(network, ipaddress.IPv6Network):
            value = int(network.network_address)
            groups = [(value >> (16 * (7 - index))) & 0xFFFF for index in range(8)]
            found.append([groups, network.prefixlen])
    return found


_TEMPLATE = """\
// Fluidity proxy auto-config, generated from the agent's bypass rules. Do not edit:
// change `bypass` in the agent's settings instead.
// Network rules match IP literals only; names are never resolved here.
var fluidityProxy = __PROXY__;
var fluidityHosts = __HOSTS__;
var fluiditySubdomains = __SUBDOMAINS__;
var fluidityDomains = __DOMAINS__;
var fluidityLocal = __LOCAL__;
var fluidityV4 = __V4__;
var fluidityV6 = __V6__;

function fluidityParseV4(text) {
  var parts = text.split(".");
  if (parts.length !== 4) return null;
  var value = 0;
  for (var i = 0; i < 4; i++) {
    var part = parts[i];
    if (!/^[0-9]{1,3}$/.test(part) || (part.length > 1 && part.charAt(0) === "0")) return null;
    var octet = parseInt(part, 10);
    if (octet > 255) return null;
    value = value * 256 + octet;
  }
  return value;
}

function fluidityParseV6(text) {
  var percent = text.indexOf("%");
  if (percent >= 0) {
    var scope = text.substring(percent + 1);
    if (scope === "" || scope.indexOf("%") >= 0) return null;
    text = text.substring(0, percent);
  }
  var parts = text.split(":");
  if (parts.length < 3) return null;
  if (parts[parts.length - 1].indexOf(".") >= 0) {
    var v4 = fluidityParseV4(parts.pop());
    if (v4 === null) return null;
    parts.push(Math.floor(v4 / 65536).toString(16));
    parts.push((v4 % 65536).toString(16));
  }
  if (parts.length > 9) return null;
  var skip = -1;
  for (var i = 1; i < parts.length - 1; i++) {
    if (parts[i] === "") {
      if (skip >= 0) return null;
      skip = i;
    }
  }
  var high, low;
  if (skip >= 0) {
    high = skip;
    low = parts.length - skip - 1;
    if (parts[0] === "") { high -= 1; if (high !== 0) return null; }
    if (parts[parts.length - 1] === "") { low -= 1; if (low !== 0) return null; }
    if (8 - (high + low) < 1) return null;
  } else {
    if (parts.length !== 8 || parts[0] === "" || parts[parts.length - 1] === "") return null;
    high = 8;
    low = 0;
  }
  var groups = [];
  var j;
  for (j = 0; j < high; j++) groups.push(parts[j]);
  for (j = 0; j < 8 - (high + low); j++) groups.push("0");
  for (j = parts.length - low; j < parts.length; j++) groups.push(parts[j]);
  var result = [];
  for (j = 0; j < 8; j++) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(groups[j])) return null;
    result.push(parseInt(groups[j], 16));
  }
  return result;
}

function fluidityInV4(value) {
  for (var i = 0; i < fluidityV4.length; i++) {
    var size = Math.pow(2, 32 - fluidityV4[i][1]);
    if (Math.floor(value / size) === Math.floor(fluidityV4[i][0] / size)) return true;
  }
  return false;
}

function fluidityInV6(groups) {
  for (var i = 0; i < fluidityV6.length; i++) {
    var network = fluidityV6[i][0], bits = fluidityV6[i][1], inside = true;
    for (var g = 0; g < 8 && bits > 0; g++) {
      var take = bits >= 16 ? 16 : bits;
      var size = Math.pow(2, 16 - take);
      if (Math.floor(groups[g] / size) !== Math.floor(network[g] / size)) { inside = false; break; }
      bits -= take;
    }
    if (inside) return true;
  }
  return false;
}

function fluidityDirect(host) {
  host = host.toLowerCase();
  if (host.charAt(0) === "[" && host.charAt(host.length - 1) === "]") {
    host = host.substring(1, host.length - 1);
  }
  host = host.replace(/\\.+$/, "");
  if (host === "") return false;
  var v4 = fluidityParseV4(host);
  if (v4 !== null) return fluidityInV4(v4);
  if (host.indexOf(":") >= 0) {
    var v6 = fluidityParseV6(host);
    if (v6 !== null) {
      if (fluidityInV6(v6)) return true;
      var mapped = v6[0] === 0 && v6[1] === 0 && v6[2] === 0 && v6[3] === 0 && v6[4] === 0 && v6[5] === 65535;
      return mapped && fluidityInV4(v6[6] * 65536 + v6[7]);
    }
  }
  if (fluidityLocal && host.indexOf(".") < 0) return true;
  var i;
  for (i = 0; i < fluidityHosts.length; i++) if (host === fluidityHosts[i]) return true;
  for (i = 0; i < fluiditySubdomains.length; i++) {
    var under = "." + fluiditySubdomains[i];
    if (host.length > under.length && host.substring(host.length - under.length) === under) return true;
  }
  for (i = 0; i < fluidityDomains.length; i++) {
    var name = fluidityDomains[i], dotted = "." + name;
    if (host === name) return true;
    if (host.length > dotted.length && host.substring(host.length - dotted.length) === dotted) return true;
  }
  return false;
}

function FindProxyForURL(url, host) {
  return fluidityDirect(host) ? "DIRECT" : fluidityProxy;
}
"""


def render_pac(rules: BypassRules, host: str, port: int, *, fallback_direct: bool = False) -> str:
    """The PAC script: DIRECT for what ``rules`` bypass, the agent (HTTP, then SOCKS5) otherwise."""

    def names(kind: PatternKind) -> str:
        return json.dumps([pattern.name for pattern in rules.of_kind(kind)])

    values = {
        "__PROXY__": json.dumps(proxy_directive(host, port, fallback_direct=fallback_direct)),
        "__HOSTS__": names(PatternKind.HOST),
        "__SUBDOMAINS__": names(PatternKind.SUBDOMAINS),
        "__DOMAINS__": names(PatternKind.DOMAIN),
        "__LOCAL__": "true" if rules.has_local else "false",
        "__V4__": json.dumps(_v4_networks(rules)),
        "__V6__": json.dumps(_v6_networks(rules)),
    }
    text = _TEMPLATE
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text
