"""The `medveil` command (thin layer over the runtime)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

app = typer.Typer(help="medveil: privacy-preserving multi-center medical data collaboration.", no_args_is_help=True)
node_app = typer.Typer(help="Run and manage a site's node.", no_args_is_help=True)
app.add_typer(node_app, name="node")


@node_app.command("start")
def node_start(config: Path = typer.Option(..., help="site YAML config"),
               quiet: bool = typer.Option(False, help="log warnings only")) -> None:
    """Start the node: long-poll the hub for tasks until interrupted."""
    from medveil.runtime.node import Node

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s")
    node = Node.from_config_file(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        node.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
