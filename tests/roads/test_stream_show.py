"""`wrapguard show` renders a stream peer's road, its state and its last problem."""

from __future__ import annotations

from wrapguard.control.show import render


def test_show_names_the_road_and_its_problem() -> None:
    state = {
        "interface": {"public_key": "pub"},
        "peers": [
            {
                "public_key": "p1",
                "endpoint": "https://relay.example/wg",
                "allowed_ips": ["10.0.0.0/24"],
                "transport": "https",
                "stream": {
                    "state": "backoff",
                    "connects": 3,
                    "proxy": "http://proxy:3128",
                    "last_error": "cannot connect: Connection refused",
                },
            },
            {"public_key": "p2", "endpoint": "192.0.2.1:51820", "transport": "udp"},
        ],
    }
    text = render(state, now=0)
    assert "  endpoint: https://relay.example/wg" in text
    assert (
        "  transport: https stream (backoff, 3 connects, via http://proxy:3128); "
        "last problem: cannot connect: Connection refused"
    ) in text
    assert "  transport: udp\n" in text + "\n"
