"""``libstore cache`` (this machine's cache of a team's object store) and ``libstore blobs migrate``."""

from __future__ import annotations

import datetime as dt

import click

from libstore.cli.app import State
from libstore.cli.output import echo_json, echo_table, human_bytes, json_option


@click.group()
def cache() -> None:
    """This machine's bounded cache of the team's object store (see README "Team setup")."""


@cache.command("ls")
@json_option
@click.pass_obj
def cache_ls(state: State, as_json: bool) -> None:
    """List cached blobs, least recently used (evicted first) at the top.

    \b
    Example:
      libstore cache ls
    """
    stats = state.lib.cache_stats()
    if as_json:
        echo_json(stats)
        return
    echo_table(
        ["sha256", "size", "last used"],
        [
            [
                b.sha256[:16],
                human_bytes(b.size),
                dt.datetime.fromtimestamp(b.claimed_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for b in stats.entries
        ],
    )


@cache.command("size")
@json_option
@click.pass_obj
def cache_size(state: State, as_json: bool) -> None:
    """Print the cache's size and its limit ($LIBSTORE_CACHE_MAX_BYTES).

    \b
    Example:
      libstore cache size
    """
    stats = state.lib.cache_stats()
    if as_json:
        echo_json({"blobs": len(stats.entries), "bytes": stats.bytes, "max_bytes": stats.max_bytes})
    else:
        click.echo(
            f"{len(stats.entries)} blobs, {human_bytes(stats.bytes)} of {human_bytes(stats.max_bytes)}"
        )


@cache.command("clear")
@click.pass_obj
def cache_clear(state: State) -> None:
    """Empty the cache; blobs are downloaded again when used (nothing shared changes).

    \b
    Example:
      libstore cache clear
    """
    stats = state.lib.cache_clear()
    click.echo(f"Removed {len(stats.entries)} cached blobs ({human_bytes(stats.bytes)})")


@click.group()
def blobs() -> None:
    """Where the library keeps its blobs."""


@blobs.command("migrate")
@click.option("--to", "to", required=True, metavar="URL", help="The object store, s3://BUCKET/PREFIX.")
@json_option
@click.pass_obj
def migrate(state: State, to: str, as_json: bool) -> None:
    """Move this library's blobs to an object store and record it in the catalog (resumable).

    Credentials and endpoint come from the AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...).

    \b
    Example:
      libstore blobs migrate --to s3://team-bucket/lib
    """
    report = state.lib.migrate_blobs(to)
    if as_json:
        echo_json(report)
    else:
        click.echo(
            f"{len(report.uploaded)} blobs uploaded, {len(report.present)} already there "
            f"({human_bytes(report.bytes)}); the library's blobs are now in {report.url}"
        )


COMMANDS = [cache, blobs]
