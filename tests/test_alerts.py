"""Alerts: a failed backup, a failed drill or an overdue backup mails the operators through SES's SMTP
interface. Here the SMTP server is aiosmtpd on 127.0.0.1, as strict as SES's: STARTTLS before anything
(with a certificate of a test CA), then AUTH with the user and password. The IAM policy that limits the
SES user to the backup address and the ops address is evaluated with principalmapper's local policy
simulation (conditions included)."""
from __future__ import annotations

import collections
import collections.abc
import json
import os
import ssl
import subprocess
import time
import uuid
import email.policy
from email import message_from_bytes
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from infra.policies import backup_alert_policy
from tests.pgcluster import free_port
from tests.s3_sandbox import HOST, STAGE, Backups

# principalmapper 1.1.5 imports Mapping and MutableMapping from `collections`, whence Python 3.10 removed
# them (as tests/test_deploy_role.py does too).
for _name in ("Mapping", "MutableMapping"):
    setattr(collections, _name, getattr(collections.abc, _name))
from principalmapper.querying.local_policy_simulation import policy_has_matching_statement  # noqa: E402
from principalmapper.util.case_insensitive_dict import CaseInsensitiveDict  # noqa: E402

pytest_plugins = ["tests.s3_sandbox"]

ALERT = HOST / "send-alert.py"
WATCHDOG = HOST / "backup-watchdog.sh"
FROM, TO = "backups@katforge.com", "ops@katforge.com"
USER = "AKIAALERTSENDER00000"


class Mailbox:
    """What the SMTP server accepted, and from whom (the authenticated user)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, list[str], object]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((session.authenticated and session.auth_data, envelope.mail_from, envelope.rcpt_tos,
                              message_from_bytes(envelope.original_content, policy=email.policy.default)))
        return "250 OK"


@pytest.fixture(scope="module")
def smtp(tmp_path_factory):
    work = tmp_path_factory.mktemp("smtp")
    password = f"smtp-{uuid.uuid4().hex}"
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    mailbox = Mailbox()

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode() \
            and auth_data.password == password.encode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, tls_context=server_context,
                            require_starttls=True, auth_required=True, auth_require_tls=True,
                            authenticator=authenticate)
    controller.start()
    secret = work / "alert-smtp-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    env = {"ALERT_SMTP_HOST": "127.0.0.1", "ALERT_SMTP_PORT": str(port), "ALERT_SMTP_USER": USER,
           "ALERT_FROM": FROM, "ALERT_TO": TO, "ALERT_SMTP_PASSWORD_FILE": str(secret),
           "ALERT_SMTP_CA_FILE": str(work / "ca.pem"), "KATFORGE_ALERT_ENV_FILE": "/dev/null",
           "ALERT_COMMAND": str(ALERT)}
    yield mailbox, env
    controller.stop()


def wait_for_mail(mailbox: Mailbox, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(mailbox.messages) < count:
        assert time.monotonic() < deadline, "no mail arrived"
        time.sleep(0.02)


def test_a_failed_backup_mails_the_operators_once(smtp, s3, pg, tmp_path):
    """One mail for the run, naming what failed; the database that was backed up is not in it."""
    mailbox, env = smtp
    before = len(mailbox.messages)
    backups = Backups(s3, pg, tmp_path)
    missing, good = f"bk_missing_{uuid.uuid4().hex[:6]}", f"bk_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {good}")
    try:
        result = backups.backup(f"{STAGE}:{missing}", f"{STAGE}:{good}", **env)
    finally:
        pg.psql(f"DROP DATABASE {good}")
    assert result.returncode != 0
    wait_for_mail(mailbox, before + 1)
    time.sleep(0.2)
    assert len(mailbox.messages) == before + 1
    login, mail_from, recipients, message = mailbox.messages[-1]
    assert login.login == USER.encode()  # authenticated, after STARTTLS (the server demands both)
    assert (mail_from, recipients) == (FROM, [TO])
    assert message["From"] == FROM and message["To"] == TO
    assert message["Subject"].endswith("] backup FAILED") and message["Subject"].startswith("[katforge ")
    assert f"FAILED {STAGE}/{missing}/" in message.get_content() and good not in message.get_content()
    assert f"sent {message['Subject']!r} to {TO}" in result.stderr


def watchdog(state: Path, env: dict, targets: str = "prod:katforge qa:katforge_qa") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(WATCHDOG)], env={**os.environ, **env, "BACKUP_STATE_DIR": str(state),
                                                        "BACKUP_TARGETS": targets},
                          capture_output=True, text=True, timeout=30)


def test_the_watchdog_mails_once_a_day_while_no_backup_has_succeeded_for_26_hours(smtp, tmp_path):
    mailbox, env = smtp
    noted = tmp_path / "backup"
    noted.mkdir()
    now = time.time()
    for stage, database, hours in (("prod", "katforge", 27), ("qa", "katforge_qa", 2)):
        path = noted / f"{stage}.{database}.last-success"
        path.write_text(f"{stage}/{database}/20261129T033000Z.dump\n")
        os.utime(path, (now - hours * 3600, now - hours * 3600))
    before = len(mailbox.messages)

    result = watchdog(tmp_path, env)
    assert result.returncode == 1
    wait_for_mail(mailbox, before + 1)
    _, _, recipients, message = mailbox.messages[-1]
    assert recipients == [TO] and message["Subject"].endswith("] backup overdue")
    body = message.get_content()
    assert "prod:katforge: last successful backup" in body and "prod/katforge/20261129T033000Z.dump" in body
    assert "qa:katforge_qa" not in body

    # Within the day: not mailed again, but still failing.
    result = watchdog(tmp_path, env)
    assert result.returncode == 1 and "already mailed" in result.stderr
    assert len(mailbox.messages) == before + 1

    # A backup succeeds: all clear, and the next lapse is mailed at once.
    os.utime(noted / "prod.katforge.last-success")
    assert watchdog(tmp_path, env).returncode == 0
    assert not (noted / "overdue-alerted").exists()


def test_the_watchdog_counts_a_never_backed_up_database_from_its_first_watch(smtp, tmp_path):
    mailbox, env = smtp
    before = len(mailbox.messages)
    assert watchdog(tmp_path, env).returncode == 0  # just installed: nothing is overdue yet
    since = tmp_path / "backup" / "watching-since"
    os.utime(since, (time.time() - 27 * 3600,) * 2)
    assert watchdog(tmp_path, env).returncode == 1
    wait_for_mail(mailbox, before + 1)
    assert "no successful backup since the watch began" in mailbox.messages[-1][3].get_content()


def test_a_wrong_smtp_password_is_reported(smtp, tmp_path):
    _, env = smtp
    wrong = tmp_path / "password"
    wrong.write_text("not-it\n")
    result = subprocess.run([str(ALERT), "test"], input="body", capture_output=True, text=True,
                            env={**os.environ, **env, "ALERT_SMTP_PASSWORD_FILE": str(wrong)})
    assert result.returncode == 1
    assert f"could not send '[katforge" in result.stderr and "535" in result.stderr
    assert "not-it" not in result.stderr


IDENTITY = "arn:aws:ses:us-east-2:*:identity/katforge.com"  # as infra/backups.py names it
SENT_AS = "arn:aws:ses:us-east-2:123456789012:identity/katforge.com"


@pytest.mark.parametrize("action, sender, recipients, allowed", [
    ("ses:SendRawEmail", FROM, [TO], True),
    ("ses:SendRawEmail", "noreply@katforge.com", [TO], False),
    ("ses:SendRawEmail", FROM, [TO, "someone@example.com"], False),
    ("ses:SendRawEmail", FROM, ["someone@example.com"], False),
    ("ses:SendEmail", FROM, [TO], False),
])
def test_the_alert_sender_may_mail_only_from_the_backup_address_to_the_ops_address(action, sender, recipients, allowed):
    policy = backup_alert_policy(IDENTITY, FROM, [TO])
    context = CaseInsensitiveDict({"ses:FromAddress": sender, "ses:Recipients": recipients})
    assert policy_has_matching_statement(json.loads(policy), "Allow", action, SENT_AS, context) is allowed
    # Another identity (another domain of the account) is not the sender's either.
    assert not policy_has_matching_statement(json.loads(policy), "Allow", action,
                                             SENT_AS.replace("katforge.com", "stumper.gg"), context)
