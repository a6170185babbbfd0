"""Fallback upstream sink for the benchmark when Postfix's smtp-sink is not
installed: accepts every message and discards it."""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.smtp import SMTP


class Discard:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 Ok"


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Discard(), hostname="sink.bench", data_size_limit=None, loop=loop),
        "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
