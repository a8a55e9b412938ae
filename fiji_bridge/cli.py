"""The ``fiji-bridge`` command line.

Each command is a thin wrapper: it parses options and calls the module that
does the work (server, client, backends, batch, macros, demo). Heavy imports
happen inside the commands, so ``fiji-bridge --help`` is instant.
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from .ports import DATA_PORT_OFFSET, DEFAULT_PORT  # control port; data on port + DATA_PORT_OFFSET


def _use_imagej(imagej: Optional[str], headless: Optional[bool] = None) -> None:
    """--imagej DIR / --headless: the engine's environment, which bridges and
    their engine workers (child processes) inherit."""
    import os

    if imagej:
        os.environ["FIJI_BRIDGE_IMAGEJ"] = imagej
    if headless is not None:
        os.environ["FIJI_BRIDGE_HEADLESS"] = "1" if headless else "0"


_IMAGEJ_HELP = "a Fiji.app folder (or Maven coordinates) to run on Fiji instead of ImageJ 1 (sets FIJI_BRIDGE_IMAGEJ)"


def _parse_args(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"{p!r}: expected key=value", param_hint="--arg")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fiji-bridge")
def main() -> None:
    """fiji-bridge: Fiji/ImageJ as a service for Python pipelines and OMERO."""


# --------------------------------------------------------------------------- service


@main.command()
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help=f"control port; data on port+{DATA_PORT_OFFSET}")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind (non-loopback needs --keys)")
@click.option("--ipc", is_flag=True, help="bind ipc:// sockets instead of tcp (Unix)")
@click.option("--engine", type=click.Choice(["auto", "imagej1", "pyimagej", "fiji"]), default="auto", show_default=True)
@click.option("--display/--no-display", default=None, help="show live Fiji windows (default: when DISPLAY is set)")
@click.option("--openhcs-port", type=int, default=None, help="also act as OpenHCS's Fiji viewer on this port")
@click.option("--openhcs-macros", type=click.Choice(["ipc", "any", "off"]), default="ipc", show_default=True, help="where OpenHCS's run_macro is served: ipc (a private socket folder only), any (loopback tcp too: any local account can run code), off")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False), default=None, help="CurveZMQ key folder (see `fiji-bridge keys`)")
@click.option("--parent-pid", type=int, default=None, help="shut down when the process with this pid (the owner) ends")
@click.option("--allow-save-to", "allow_save_to", multiple=True, metavar="DIR|omero://HOST", help="where run_macro(save_to=...) may write (repeatable; default: your home and the temporary folder)")
@click.option("--imagej", default=None, help=_IMAGEJ_HELP)
@click.option("--headless/--no-headless", default=None, help="Fiji without a screen (default: headless on macOS only)")
def serve(port: int, host: str, ipc: bool, engine: str, display: Optional[bool], openhcs_port: Optional[int], openhcs_macros: str, keys_dir: Optional[str], parent_pid: Optional[int], allow_save_to: tuple[str, ...], imagej: Optional[str], headless: Optional[bool]) -> None:
    """Run the bridge: own ImageJ, take planes, run macros on request."""
    from .server import serve as _serve

    _use_imagej(imagej, headless)

    sys.exit(_serve(port=port, host=host, ipc=ipc, engine=engine, display=display, openhcs_port=openhcs_port, keys_dir=keys_dir, parent_pid=parent_pid, allow_save_to=list(allow_save_to) or None, openhcs_macros=openhcs_macros))


@main.command()
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the raw status as JSON")
def status(port: int, host: str, as_json: bool) -> None:
    """Show whether a bridge answers on PORT, its engine and its stacks."""
    from .commands import status_command

    sys.exit(status_command(port=port, host=host, as_json=as_json))


@main.command()
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def stop(port: int, host: str) -> None:
    """Ask the bridge on PORT to shut down."""
    from .commands import stop_command

    sys.exit(stop_command(port=port, host=host))


@main.command()
@click.argument("source")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--wells", default="all", show_default=True, help="comma-separated wells, or all")
@click.option("--live", is_flag=True, help="drop planes instead of blocking when the bridge is slow")
def stream(source: str, port: int, host: str, wells: str, live: bool) -> None:
    """Stream a plate (URI) or a folder of TIFFs into a bridge as hyperstacks."""
    from .commands import stream_command

    sys.exit(stream_command(source, port=port, host=host, wells=wells, live=live))


@main.command()
@click.option("--stack", "stack_key", required=True, help="stack key (see `fiji-bridge status`)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--montage", is_flag=True, help="a montage of all C/Z planes instead of the composite")
def snapshot(stack_key: str, output: str, port: int, host: str, montage: bool) -> None:
    """Render a stack as Fiji shows it into a PNG (no screen needed)."""
    from .commands import snapshot_command

    sys.exit(snapshot_command(stack_key, output, port=port, host=host, montage=montage))


@main.command()
@click.option("-o", "--output", "out_dir", default=".fiji-bridge/keys", show_default=True, type=click.Path(file_okay=False))
def keys(out_dir: str) -> None:
    """Make a CurveZMQ key pair for the server and one for clients."""
    from .security import keys_command

    sys.exit(keys_command(out_dir))


# --------------------------------------------------------------------------- macros


@main.command()
@click.argument("macro")
@click.option("--stack", "stack_key", default=None, help="run on this stack of the bridge")
@click.option("--image", "image_path", default=None, type=click.Path(exists=True, dir_okay=False), help="run on this TIFF")
@click.option("--arg", "args", multiple=True, help="macro parameter key=value (repeatable)")
@click.option("--save-to", default=None, help="push outputs to this plate URI from the bridge")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--timeout", type=float, default=600, show_default=True)
@click.option("-o", "--output", "out_dir", default=None, type=click.Path(file_okay=False), help="write images (TIFF) and tables (CSV) here")
def run(macro: str, stack_key: Optional[str], image_path: Optional[str], args: tuple[str, ...], save_to: Optional[str], port: int, host: str, timeout: float, out_dir: Optional[str]) -> None:
    """Run MACRO (a library name or a .ijm path) through the bridge."""
    from .commands import run_command

    sys.exit(run_command(macro, stack_key=stack_key, image_path=image_path, args=_parse_args(args), save_to=save_to, port=port, host=host, timeout=timeout, out_dir=out_dir))


@main.command("macros")
@click.argument("name", required=False)
def macros_cmd(name: Optional[str]) -> None:
    """List the macro library with parameters (or show one macro)."""
    from .macros import macros_command

    sys.exit(macros_command(name))


# --------------------------------------------------------------------------- plates


@main.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--plate", "plate_uri", required=True, help="target plate URI: a path, zarr:///p.zarr, ometiff:///dir, omero://host/plate/NAME")
@click.option("--pattern", default=None, help="cellomics | imagexpress | a regex with named groups well, site, channel[, z, t]")
@click.option("--name", default=None, help="plate name (default: from the file names)")
def import_cmd(folder: str, plate_uri: str, pattern: Optional[str], name: Optional[str]) -> None:
    """Build a plate from a folder of HCS image files."""
    from .importer import import_command

    sys.exit(import_command(folder, plate_uri, pattern=pattern, name=name))


@main.command()
@click.option("--plate", "plate_uri", required=True, help="source plate URI")
@click.option("--macro", required=True, help="library macro name or .ijm path")
@click.option("--arg", "args", multiple=True, help="macro parameter key=value (repeatable)")
@click.option("--out", "out_uri", default=None, help="derived plate URI (default: beside the source)")
@click.option("--wells", default="all", show_default=True, help="A01,B02 or all")
@click.option("--workers", type=int, default=1, show_default=True, help="ImageJ engine workers (JVM processes) this batch starts and supervises")
@click.option("--scheduler", default=None, help="Dask scheduler address, tcp://host:8786")
@click.option("--resume", is_flag=True, help="skip units whose outputs exist")
@click.option("--timeout", type=float, default=600, show_default=True, help="per-unit macro timeout (s)")
@click.option("--port", "ports", type=int, multiple=True, help="use the bridge on this port (repeatable; spawned if none answers, left running) instead of spawning --workers bridges")
@click.option("--imagej", default=None, help=_IMAGEJ_HELP + "; for the bridges this batch spawns")
@click.option("--labels", "labels", multiple=True, help="store output image IMAGE as an NGFF label image: IMAGE[=NAME][:objects] (objects: connected components of a binary mask; 'rois=NAME': the ROI Manager's areas); repeatable")
@click.option("--labels-to-source", is_flag=True, help="also write the label images into the source plate's fields")
@click.option("--ngff", "ngff", type=click.Choice(["0.4", "0.5"]), default=None, help="NGFF version of a new OME-Zarr derived plate (default 0.4; 0.5 is zarr v3)")
def batch(plate_uri: str, macro: str, args: tuple[str, ...], out_uri: Optional[str], wells: str, workers: int, scheduler: Optional[str], resume: bool, timeout: float, ports: tuple[int, ...], imagej: Optional[str], labels: tuple[str, ...], labels_to_source: bool, ngff: Optional[str]) -> None:
    """Run a macro over every well field of a plate; write a derived plate and a results table."""
    import os

    _use_imagej(imagej)
    # the batch's own engine workers start before its imports (numpy, zmq, the stores):
    # their JVMs start that much sooner
    from .batch_engines import runs_own_engines, spawn_for_batch, yield_to_workers

    spawned = spawn_for_batch(workers) if runs_own_engines(scheduler, ports, resume) else None
    if spawned is not None:
        yield_to_workers()  # the macros get the cores first; the writer keeps up in between
    from .batch import batch_command

    if ngff:
        os.environ["FIJI_BRIDGE_NGFF_VERSION"] = ngff

    code = batch_command(plate_uri, macro, args=_parse_args(args), out_uri=out_uri, wells=wells, workers=workers, scheduler=scheduler, resume=resume, timeout=timeout, ports=ports, labels=list(labels) or None, labels_to_source=labels_to_source, spawned=spawned)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: a finished batch has
    written, closed and waited for everything it started, and tearing down
    zarr, numcodecs and pyarrow (0.1-0.2 s) would only keep the shell waiting."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command()
@click.option("-o", "--output", "out_dir", default="demo-output", show_default=True, type=click.Path(file_okay=False))
@click.option("--port", type=int, default=None, help="bridge port (default: a free one)")
@click.option("--imagej", default=None, help=_IMAGEJ_HELP)
def demo(out_dir: str, port: Optional[int], imagej: Optional[str]) -> None:
    """The main job end to end: synthetic plate -> bridge -> nuclei batch -> results."""
    from .demo import demo_command

    _use_imagej(imagej)

    sys.exit(demo_command(out_dir, port=port))


if __name__ == "__main__":  # pragma: no cover
    main()
