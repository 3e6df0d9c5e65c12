"""hearth: the operators' command line for the running estate (status, logs, rollback).

It reads the same tables the Pulumi program declares the estate from: the apps and their routes
(infra/apps.py), the stages' namespaces and databases (infra/settings.py), the DNS records
(infra/dns.py), the host's memory budget (infra/capacity.py) and the stack files' addresses and backup
bucket (tools/offline.py). An app added to the table is one hearth knows.
"""
