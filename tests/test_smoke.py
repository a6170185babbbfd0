"""End-to-end: an authenticated client's message reaches the sink."""


from conftest import simple_message, sink_upstream, smtp_client
from helpers_smtp import without_trace


async def test_delivers_through_upstream(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    client = await smtp_client(relay, tenant)
    errors, reply = await client.sendmail("app@example.com", ["a@example.net", "b@example.net"],
                                          simple_message())
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    await client.quit()
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]
    assert without_trace(got.data) == simple_message()
