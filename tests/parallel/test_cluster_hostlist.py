"""SLURM node lists (utils/cluster_launch.py): expand_hostlist on SLURM's
documented forms and on malformed lists, and scontrol's own reading used
where a `scontrol` runs (a fake one on PATH here)."""

import os
import stat

import pytest

from utils.cluster_launch import expand_hostlist, first_host, scontrol_hosts, torchrun_command

FORMS = [
    ("node-a", ["node-a"]),
    ("gpu1,gpu2", ["gpu1", "gpu2"]),
    ("cn[07-09,12],gpu1", ["cn07", "cn08", "cn09", "cn12", "gpu1"]),  # ranges and lists, then a plain name
    ("n[01-04]", ["n01", "n02", "n03", "n04"]),  # zero padding keeps the width
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[7]", ["n7"]),  # a single number
    ("a[1,3-4]", ["a1", "a3", "a4"]),  # mixed
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),  # a suffix after the bracket
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),  # the first group varies slowest
    ("r[1-2]n[3,5]-ib,login", ["r1n3-ib", "r1n5-ib", "r2n3-ib", "r2n5-ib", "login"]),
    ("[1-2]x", ["1x", "2x"]),  # a bracket first
    ("  cn[1-2]\n", ["cn1", "cn2"]),  # the environment's surrounding space
]


@pytest.mark.parametrize("nodelist, hosts", FORMS)
def test_slurm_forms(nodelist, hosts, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the parser answers
    assert expand_hostlist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


MALFORMED = [
    ("", "it is empty"),
    ("n[1-3", "a bracket is not closed"),
    ("n1-3]", "unbalanced or nested brackets"),
    ("n[[1-2]]", "unbalanced or nested brackets"),
    ("n[]", r"\[\] in 'n\[\]' is not a list of numbers and ranges like \[1-4,7\] or \[01-08\]"),
    ("n[a-c]", r"\[a-c\] in 'n\[a-c\]' is not a list of numbers"),
    ("n[1-2,]", "is not a list of numbers"),
    ("n[5-3]", "the range 5-3 in 'n\\[5-3\\]' goes down"),
    ("a,,b", "an empty host name"),
    ("a,", "an empty host name"),
    ("a, b", "space in the host name ' b'"),
    ("n[1-9999999]", "names more than 65,536 hosts"),
    ("n[1-300]m[1-300]", "names more than 65,536 hosts"),
]


@pytest.mark.parametrize("nodelist, why", MALFORMED)
def test_malformed_lists_are_refused_naming_the_list(nodelist, why, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ValueError, match=f"cannot read the SLURM node list .*: .*{why}.*; pass --master_addr"):
        first_host(nodelist)


def _fake_scontrol(tmp_path, body):
    exe = tmp_path / "scontrol"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{tmp_path}:{os.environ['PATH']}"


def test_scontrol_reading_is_used_where_it_runs(tmp_path, monkeypatch):
    # SLURM's own reading wins, even where it differs from the parser's (a site's own syntax)
    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path, '[ "$1 $2 $3" = "show hostnames gpu[1-2]-ib" ] || exit 1\n'
                                                        'printf "gpu1-ib.site\\ngpu2-ib.site\\n"\n'))
    assert scontrol_hosts("gpu[1-2]-ib") == ["gpu1-ib.site", "gpu2-ib.site"]
    cmd, _ = torchrun_command(["--", "x.py"], {"SLURM_JOB_NODELIST": "gpu[1-2]-ib", "SLURM_NNODES": "2",
                                               "SLURM_NODEID": "0"}, python="py")
    assert cmd[cmd.index("--master_addr") + 1] == "gpu1-ib.site"


@pytest.mark.parametrize("body", ["echo 'scontrol: error: no slurm.conf' >&2; exit 1\n", "exit 0\n"])
def test_a_failing_scontrol_falls_back_to_the_parser(body, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path, body))
    assert scontrol_hosts("rack[1-2]-n[01-04]") is None
    assert first_host("rack[1-2]-n[01-04]") == "rack1-n01"


def test_a_malformed_list_stops_the_launcher_with_its_message(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SystemExit) as e:
        torchrun_command(["--", "x.py"], {"SLURM_JOB_NODELIST": "gpu[1-2", "SLURM_NNODES": "2", "SLURM_NODEID": "0"})
    assert e.value.code == 2
    assert "cannot read the SLURM node list 'gpu[1-2': a bracket is not closed; pass --master_addr" in \
        capsys.readouterr().err
