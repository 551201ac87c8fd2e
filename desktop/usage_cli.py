"""`fluidity usage` (or `fluidity-agent --usage`): this month's server time, traffic and cost.

It reads the usage file the tray and the agent keep and the prices and budget from the
settings, and changes nothing, so it can run while the tray is connected.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from desktop.budget import effective_budget
from desktop.config import AgentConfig, default_agent_config_path
from desktop.usage import Prices, UsageStore, default_usage_path, report_lines
from server.config_loader import ConfigError, add_arguments, load_from_args, program_parser

#: The settings this report reads.
PRICE_KEYS = ("price_per_hour", "price_per_gb_out", "monthly_budget")


def main(argv: Sequence[str] | None = None, *, prog: str = "fluidity usage") -> int:
    parser = program_parser(
        prog,
        "Print this month's server time, traffic and their cost, with the monthly budget if one is set.",
        (f"{prog}", f"{prog} --config ./configs/agent.yaml --price-per-hour 0.02"),
    )
    add_arguments(parser, AgentConfig)
    args = parser.parse_args(argv)
    try:
        config = load_from_args(AgentConfig, args, default_path=default_agent_config_path())
    except ConfigError as error:
        if error.key in PRICE_KEYS:
            print(f"{prog}: {error}", file=sys.stderr)
            return 2
        # Only the prices and the budget matter here: settings that could not connect anywhere
        # yet (no server address, no API key) still have them.
        args.lifecycle = "local"
        try:
            config = load_from_args(AgentConfig, args, default_path=default_agent_config_path())
        except ConfigError:
            print(f"{prog}: {error}", file=sys.stderr)
            return 2
    store = UsageStore(default_usage_path())
    prices = Prices(config.price_per_hour, config.price_per_gb_out)
    budget = effective_budget(config.monthly_budget) or None
    for line in report_lines(store, prices, budget=budget):
        print(line)
    if store.path is not None and not store.path.exists():
        print(f"  (nothing recorded yet in {store.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
