#!/usr/bin/env python3
"""Mail an alert to the operators through SES's SMTP interface: the subject from the arguments, the
body from stdin. Installed on the k3s host as /usr/local/sbin/katforge-alert; the backup, the drill and
the backup watchdog run it when they fail.

    katforge-alert SUBJECT WORDS... < body

From /etc/katforge/alert.env (written by Pulumi, infra/backups.py), or the environment:
ALERT_SMTP_HOST, ALERT_SMTP_PORT (587: STARTTLS, which is required), ALERT_SMTP_USER, ALERT_FROM,
ALERT_TO, ALERT_SMTP_PASSWORD_FILE (the SMTP password, root's alone: 0600, never on a command line or in
the environment), ALERT_SMTP_CA_FILE (another CA to trust; tests only). The SES user may send only from
ALERT_FROM to ALERT_TO (its IAM policy's conditions), so this host cannot mail anyone else.
"""
from __future__ import annotations

import os
import smtplib
import socket
import ssl
import sys
from email.message import EmailMessage

ENV_FILE = "/etc/katforge/alert.env"
KEYS = ("ALERT_SMTP_HOST", "ALERT_SMTP_PORT", "ALERT_SMTP_USER", "ALERT_FROM", "ALERT_TO",
        "ALERT_SMTP_PASSWORD_FILE", "ALERT_SMTP_CA_FILE")


def settings() -> dict[str, str]:
    found: dict[str, str] = {}
    if os.path.exists(os.environ.get("KATFORGE_ALERT_ENV_FILE", ENV_FILE)):
        with open(os.environ.get("KATFORGE_ALERT_ENV_FILE", ENV_FILE)) as lines:
            for line in lines:
                key, _, value = line.strip().partition("=")
                if key in KEYS:
                    found[key] = value.strip('"')
    found.update({key: os.environ[key] for key in KEYS if os.environ.get(key)})
    return found


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: katforge-alert SUBJECT... < body", file=sys.stderr)
        return 2
    config = settings()
    missing = [key for key in KEYS[:-1] if not config.get(key)]
    if missing:
        print(f"katforge-alert: not configured ({', '.join(missing)} unset in {ENV_FILE}); nothing sent", file=sys.stderr)
        return 1
    with open(config["ALERT_SMTP_PASSWORD_FILE"]) as secret:
        password = secret.read().strip()
    host = socket.gethostname()
    message = EmailMessage()
    message["From"] = config["ALERT_FROM"]
    message["To"] = config["ALERT_TO"]
    message["Subject"] = f"[katforge {host}] {' '.join(sys.argv[1:])}"
    message.set_content(f"{sys.stdin.read()}\n-- \nkatforge-alert on {host}\n")
    context = ssl.create_default_context(cafile=config.get("ALERT_SMTP_CA_FILE") or None)
    try:
        with smtplib.SMTP(config["ALERT_SMTP_HOST"], int(config["ALERT_SMTP_PORT"]), timeout=30) as smtp:
            smtp.starttls(context=context)  # the password never travels in the clear
            smtp.login(config["ALERT_SMTP_USER"], password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as error:
        print(f"katforge-alert: could not send {message['Subject']!r} to {config['ALERT_TO']}: {error}", file=sys.stderr)
        return 1
    print(f"katforge-alert: sent {message['Subject']!r} to {config['ALERT_TO']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
