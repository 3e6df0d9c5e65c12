"""Stack files are read as the Pulumi CLI reads them (go-yaml, YAML 1.2), and refused in one line naming the file."""
import math

import pytest
import yaml

from infra.settings import SettingsError
from tools import offline, plan, stackfile
from tools.offline import ROOT, evaluate, project_config_schema
from tools.stackfile import StackFileError

SCHEMA = project_config_schema()


def read(tmp_path, text: str, stack: str = "prod") -> dict:
    path = tmp_path / f"Pulumi.{stack}.yaml"
    path.write_text(text)
    return stackfile.read(path, SCHEMA)


def refusal(tmp_path, text: str) -> str:
    with pytest.raises(StackFileError) as caught:
        read(tmp_path, text)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# What go-yaml v3 makes of plain scalars (its resolve.go and resolve_test.go): YAML 1.2's core schema.
@pytest.mark.parametrize("text, value", [
    ("3:30", "3:30"), ("03:30", "03:30"), ("190:20:30", "190:20:30"),  # no base 60
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"),  # no YAML 1.1 booleans
    ("true", True), ("False", False), ("TRUE", True),
    ("", None), ("~", None), ("null", None), ("Null", None),
    ("30", 30), ("-7", -7), ("+12", 12), ("0x1F", 31), ("0o17", 15), ("0b101", 5), ("0777", 511), ("1_000", 1000),
    ("1.10", 1.1), ("1e3", 1000.0), (".5", 0.5), ("089", 89.0), (".inf", math.inf), ("-.Inf", -math.inf),
    ("2001-12-14", "2001-12-14"),  # a timestamp stays text when read into a generic value
    ("172.31.0.0/16", "172.31.0.0/16"), ("v1.2.3", "v1.2.3"), ("1.2.3", "1.2.3"),
])
def test_plain_scalars_resolve_by_the_yaml_1_2_core_schema(text, value):
    assert stackfile.plain_scalar(text) == value
    assert type(stackfile.plain_scalar(text)) is type(value)


def test_nan_is_a_float():
    assert math.isnan(stackfile.plain_scalar(".nan"))


def test_unquoted_3_30_is_the_text_pulumi_reads_and_the_settings_refuse_it(tmp_path):
    text = "config:\n  aws:region: us-east-2\n  katforge:backupTime: 3:30\n"
    assert yaml.safe_load(text)["config"]["katforge:backupTime"] == 210  # PyYAML: YAML 1.1 base 60
    config = read(tmp_path, text)
    assert config["katforge:backupTime"] == "3:30"
    with pytest.raises(SettingsError) as caught:
        evaluate("prod", config)
    assert str(caught.value) == ('Pulumi.prod.yaml: katforge:backupTime = 3:30: expected a UTC time HH:MM with '
                                 'two-digit hours, quoted, e.g. "03:30"')


def test_yaml_1_1_booleans_stay_words(tmp_path):
    config = read(tmp_path, "config:\n  katforge:dmarcPolicy: no\n  katforge:mailFromSubdomain: on\n"
                            "  katforge:sesFromAddresses:\n    - yes@katforge.com\n")
    assert config == {"katforge:dmarcPolicy": "no", "katforge:mailFromSubdomain": "on",
                      "katforge:sesFromAddresses": ["yes@katforge.com"]}


def test_a_top_level_scalar_is_its_text_as_written(tmp_path):
    """Pulumi hands the program a scalar's own text: 40 stays "40", 03:30 stays "03:30"."""
    config = read(tmp_path, "config:\n  katforge:rootVolumeGb: 40\n  katforge:backupTime: 03:30\n"
                            "  katforge:k3sPrivateIp: '172.31.14.98'\n  aws:region: us-east-2\n")
    assert config == {"katforge:rootVolumeGb": "40", "katforge:backupTime": "03:30",
                      "katforge:k3sPrivateIp": "172.31.14.98", "aws:region": "us-east-2"}


@pytest.mark.parametrize("line, message", [
    ("katforge:acmeEmail: 1.10", 'katforge:acmeEmail = 1.10: expected a quoted string, e.g. "1.10"; '
                                 "unquoted, YAML reads a number (line 3)"),
    ("katforge:mailFromSubdomain: true", 'katforge:mailFromSubdomain = true: expected a quoted string, e.g. "true"; '
                                     "unquoted, YAML reads a boolean (line 3)"),
    ("katforge:mailFromSubdomain:", 'katforge:mailFromSubdomain = (nothing): expected a quoted string, e.g. ""; '
                                "unquoted, YAML reads null (line 3)"),
    ("katforge:vpcCidr: [172.31.0.0/16]", "katforge:vpcCidr = (a list): expected a single string, not a list or a "
                                          "map (line 3)"),
    ("katforge:backupRetentionDays: 30GB", "katforge:backupRetentionDays = 30GB: expected a whole number, e.g. 30 (line 3)"),
    ("katforge:backupRetentionDays: 3.5", "katforge:backupRetentionDays = 3.5: expected a whole number, e.g. 30 (line 3)"),
    ("katforge:adminCidrs: 203.0.113.7/32", "katforge:adminCidrs = 203.0.113.7/32: expected a list, one item per "
                                            "line starting with '- ' (line 3)"),
    ("katforge:adminCidrs: [203.0.113.7/32, 1.5]", 'katforge:adminCidrs[1] = 1.5: expected a quoted string, '
                                                   'e.g. "1.5"; unquoted, YAML reads a number (line 3)'),
])
def test_a_value_not_of_its_declared_type_is_refused_in_the_settings_form(tmp_path, line, message):
    assert refusal(tmp_path, f"config:\n  aws:region: us-east-2\n  {line}\n") == f"Pulumi.prod.yaml: {message}"


def test_quoted_values_are_strings_and_whole_numbers_may_be_quoted(tmp_path):
    config = read(tmp_path, 'config:\n  katforge:acmeEmail: "ops@katforge.com"\n  katforge:rootVolumeGb: "40"\n'
                            "  katforge:adminCidrs: ['203.0.113.7/32']\n")
    assert config == {"katforge:acmeEmail": "ops@katforge.com", "katforge:rootVolumeGb": "40",
                      "katforge:adminCidrs": ["203.0.113.7/32"]}


def test_a_syntax_error_names_file_line_and_column(tmp_path):
    message = refusal(tmp_path, "config:\n  aws:region: us-east-2\n  katforge:adminCidrs: [203.0.113.7/32\n")
    assert message.startswith("Pulumi.prod.yaml: line 4, column 1: YAML syntax error: while parsing a flow "
                              "sequence (from line 3); expected ',' or ']'")


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    message = refusal(tmp_path, "config:\n  katforge:backupTime: '03:30'\n  aws:region: us-east-2\n"
                                "  katforge:backupTime: '04:00'\n")
    assert message == "Pulumi.prod.yaml: line 4: katforge:backupTime is given twice (first on line 2)"


def test_a_key_without_namespace_is_refused(tmp_path):
    assert refusal(tmp_path, "config:\n  backupTime: '03:30'\n") == (
        "Pulumi.prod.yaml: line 2: backupTime is not a config key: expected <namespace>:<name>, "
        "e.g. katforge:backupTime")


@pytest.mark.parametrize("text, message", [
    ("- config\n", "line 1: expected a map with a `config:` section"),
    ("config: [a]\n", "line 1: expected `config:` to be a map of <namespace>:<name>: value"),
    ("config:\n  katforge:adminCidrs: &a [*a]\n", "line 2: an alias refers to the value that contains it"),
])
def test_a_malformed_file_is_refused_with_its_line(tmp_path, text, message):
    assert refusal(tmp_path, text) == f"Pulumi.prod.yaml: {message}"


def test_a_secret_in_plain_text_is_refused_without_showing_it(tmp_path):
    message = refusal(tmp_path, "config:\n  katforge:dbPassword: hunter2\n")
    assert message == ("Pulumi.prod.yaml: katforge:dbPassword = [secret]: expected an encrypted value (line 2): "
                       "remove it, set a new one with: pulumi config set --secret katforge:dbPassword --stack prod")


def test_encrypted_values_are_left_to_the_cli(tmp_path):
    """Only the CLI can decrypt them: the offline plan keeps its placeholder for those keys."""
    config = read(tmp_path, "config:\n  aws:region: us-east-2\n  katforge:dbPassword:\n    secure: v1:AAAA\n"
                            "  katforge:ghcrToken: {secure: v1:BBBB}\n")
    assert config == {"aws:region": "us-east-2"}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "config:\n", "encryptionsalt: v1:abc\n"])
def test_a_file_without_config_is_empty(tmp_path, text):
    assert read(tmp_path, text) == {}


def test_a_missing_file_is_empty_as_for_the_cli(tmp_path):
    assert stackfile.read(tmp_path / "Pulumi.prod.yaml", SCHEMA) == {}


@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_the_committed_stack_files_read_cleanly(stack):
    path = ROOT / f"Pulumi.{stack}.yaml"
    assert stackfile.read(path, SCHEMA) == yaml.safe_load(path.read_text())["config"]


def test_make_plan_stops_on_a_bad_stack_file_with_one_line_and_exit_2(tmp_path, monkeypatch, capfd):
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text("config:\n  katforge:imageTags: [api=1.10, web=1.0]\n  katforge:backupTime: 3:30\n"
                    "  katforge:backupTime: 04:00\n")
    monkeypatch.setattr("tools.offline.stack_config", lambda stack, encrypted=None: stackfile.read(path, SCHEMA, encrypted))
    assert plan.main(["--stack", "prod"]) == 2
    out, err = capfd.readouterr()
    assert err == "Pulumi.prod.yaml: line 4: katforge:backupTime is given twice (first on line 3)\n" and out == ""


def test_the_offline_plan_reads_stack_files_with_this_reader(tmp_path, monkeypatch):
    (tmp_path / "Pulumi.yaml").write_text((ROOT / "Pulumi.yaml").read_text())
    (tmp_path / "Pulumi.prod.yaml").write_text("config:\n  aws:region: us-east-2\n  katforge:backupTime: 3:30\n")
    monkeypatch.setattr("tools.offline.ROOT", tmp_path)
    assert offline.stack_config("prod") == {"aws:region": "us-east-2", "katforge:backupTime": "3:30"}


# --- writing (make discover sets keys in a file that people edit too) ---------------------------------

EDITED = """# The prod stack, as an operator left it.
config:
  aws:region: us-east-2   # the only region
  katforge:dbPassword:
    secure: v1:AAAA
  # peers, one per person
  katforge:wireguardPeers:
    - alice,jbKegdqZ9bTAuaBOlP5tCHsJKcL8EV2x52OMJPIJDj8=,10.99.0.2/32  # alice's laptop
  katforge:k3sRootVolumeGb: 30  # live size
  katforge:dmarcPolicy: none

# after the config
"""
LIVE_FACTS = {"katforge:k3sRootVolumeGb": 20, "katforge:k3sRootVolumeEncrypted": False,
              "katforge:imports": ["Instance:k3s=i-0123456789abcdef0", "User:ses-sender=ses-sender"],
              "katforge:wireguardPeers": ["alice,jbKegdqZ9bTAuaBOlP5tCHsJKcL8EV2x52OMJPIJDj8=,10.99.0.2/32",
                                          "live-1,+82STPER9MA4Ina4dafvoJsejMelCaX6siPBLKK41/k=,10.99.0.3/32"],
              "katforge:vpnRootVolumeType": "1.10", "katforge:vpnSubnetId": "subnet-0a1b2c3d4e5f60002"}


def written(tmp_path, text: str, values: dict) -> tuple[list, str]:
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(text)
    return stackfile.write(path, values, SCHEMA), path.read_text()


def test_a_write_sets_the_keys_and_keeps_every_other_byte(tmp_path):
    changed, text = written(tmp_path, EDITED, LIVE_FACTS)
    assert changed == sorted(set(LIVE_FACTS))
    assert stackfile.read(tmp_path / "Pulumi.prod.yaml", SCHEMA) == {
        "aws:region": "us-east-2", "katforge:dmarcPolicy": "none", "katforge:k3sRootVolumeGb": "20",
        "katforge:k3sRootVolumeEncrypted": "false", "katforge:imports": LIVE_FACTS["katforge:imports"],
        "katforge:wireguardPeers": LIVE_FACTS["katforge:wireguardPeers"], "katforge:vpnRootVolumeType": "1.10",
        "katforge:vpnSubnetId": "subnet-0a1b2c3d4e5f60002"}
    # Every line of the original is still there, in order: comments, the encrypted value, other keys.
    lines = iter(text.splitlines())
    missing = [line for line in EDITED.splitlines()
               if line != "  katforge:k3sRootVolumeGb: 30  # live size" and line not in lines]
    assert missing == []
    assert "  katforge:k3sRootVolumeGb: 20  # live size\n" in text  # the value changes, its comment stays
    assert "    - live-1,+82STPER9MA4Ina4dafvoJsejMelCaX6siPBLKK41/k=,10.99.0.3/32\n" in text  # appended
    assert '  katforge:vpnRootVolumeType: "1.10"\n' in text  # a number to YAML, so quoted
    assert text.endswith("# after the config\n")


def test_a_second_write_of_the_same_values_changes_no_byte(tmp_path):
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(EDITED)
    stackfile.write(path, LIVE_FACTS, SCHEMA)
    before = path.read_bytes()
    assert stackfile.write(path, LIVE_FACTS, SCHEMA) == []
    assert path.read_bytes() == before


@pytest.mark.parametrize("text", ["", "config:\n", "# a comment\nconfig: ~  # empty\n", "encryptionsalt: v1:abc"])
def test_a_file_without_config_gets_a_section(tmp_path, text):
    changed, result = written(tmp_path, text, {"katforge:wireguardPort": 51821, "katforge:adminCidrs": ["198.51.100.7/32"]})
    assert changed == ["katforge:adminCidrs", "katforge:wireguardPort"]
    assert stackfile.read(tmp_path / "Pulumi.prod.yaml", SCHEMA) == {
        "katforge:wireguardPort": "51821", "katforge:adminCidrs": ["198.51.100.7/32"]}
    assert result.count("config:") == 1


def test_a_key_set_to_none_is_removed_with_its_lines(tmp_path):
    changed, text = written(tmp_path, EDITED, {"katforge:wireguardPeers": None, "katforge:acmeEmail": None})
    assert changed == ["katforge:wireguardPeers"]
    assert "wireguardPeers" not in text and "alice" not in text and "# peers, one per person" in text


def test_secrets_are_never_written(tmp_path):
    with pytest.raises(StackFileError, match="pulumi config set --secret katforge:dbPassword"):
        written(tmp_path, EDITED, {"katforge:dbPassword": "hunter2"})
    assert (tmp_path / "Pulumi.prod.yaml").read_text() == EDITED
