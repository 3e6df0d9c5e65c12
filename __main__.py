"""The Katforge estate: one stack per stage. prod owns the hosts and everything shared; qa owns only
what belongs to qa and reads the rest from prod."""
import pulumi

from infra import dns
from infra.dns import Dns
from infra.email import Email
from infra.hosts import Hosts
from infra.iam import DnsChallengeUser
from infra.network import Network
from infra.settings import load

settings = load()

if settings.is_prod:
    network = Network("network", settings.network, settings.hosts.vpn.expected_public_ip)
    hosts = Hosts("hosts", settings.hosts, settings.network.k3s_private_ip, network)
    records = Dns("dns", settings.stage, {dns.K3S_PUBLIC: hosts.k3s.public_ip, dns.VPN_PUBLIC: hosts.vpn.public_ip})
    email = Email("email", settings.email, records.zones)
    dns_challenge = DnsChallengeUser("dns-challenge", records.zones.arns)

    pulumi.export("k3sPublicIp", hosts.k3s.public_ip)
    pulumi.export("k3sPrivateIp", settings.network.k3s_private_ip)
    pulumi.export("vpnPublicIp", hosts.vpn.public_ip)
    pulumi.export("zoneIds", records.zones.ids)
    pulumi.export("sesSmtpUsername", email.smtp_username)
    pulumi.export("sesSmtpPassword", email.smtp_password)
    pulumi.export("dnsChallengeAccessKeyId", dns_challenge.access_key_id)
    pulumi.export("dnsChallengeSecretAccessKey", dns_challenge.secret_access_key)
else:
    prod = pulumi.StackReference("prod", stack_name=settings.prod_stack)
    records = Dns("dns", settings.stage, {dns.K3S_PRIVATE: prod.require_output("k3sPrivateIp")})

pulumi.export("dnsRecords", {name: record.records for name, record in records.records.items()})
