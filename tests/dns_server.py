"""A DNS server on 127.0.0.1 (UDP), speaking the real protocol: A and CNAME answers from a table the test
sets, NXDOMAIN for a name it lacks, and silence for a name in `silent` (a resolver that never answers).
dnspython builds the answers; hearth asks with --dns-server.

`pytest_plugins = ["tests.dns_server"]` gives the session fixture `dns_server`.
"""
from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest


class DnsServer:
    def __init__(self, records: dict[str, tuple[str, str]]):
        """records: name -> ("A", address[,address...]) or ("CNAME", target name)."""
        self.records = dict(records)
        self.silent: set[str] = set()
        self.asked: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        while name in self.records:
            kind, value = self.records[name]
            if kind == "CNAME":
                reply.answer.append(dns.rrset.from_text(f"{name}.", 300, "IN", "CNAME", f"{value}."))
                name = value
                continue
            if question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(f"{name}.", 300, "IN", "A", *value.split(",")))
            return reply
        if not reply.answer:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text(omit_final_dot=True).lower()
            self.asked.append(name)
            if name not in self.silent:
                self.sock.sendto(self.answer(query).to_wire(), client)

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture(scope="session")
def dns_server():
    """Every record of infra/dns.py, answered as the declared addresses of the committed prod stack say."""
    from hearth.estate import declared_addresses
    from infra.dns import RECORDS
    from tools.offline import effective_config

    addresses = declared_addresses(effective_config("prod")[0])
    server = DnsServer({r.name: ("CNAME", r.target) if r.type == "CNAME" else ("A", addresses[r.name])
                        for r in RECORDS})
    try:
        yield server
    finally:
        server.stop()
