"""The agent kabin forwards to the nodes (kabin.sshagent): the replies OpenSSH's client
expects, checked with paramiko's own signature verification. Its use by a real ssh -A
is in test_chaincast_treelaunch."""

import struct

import paramiko
from paramiko.message import Message

from kabin import sshagent


def request(kind, *strings, flags=None):
    message = Message()
    message.add_byte(bytes([kind]))
    for value in strings:
        message.add_string(value)
    if flags is not None:
        message.add_int(flags)
    return message.asbytes()


def test_it_lists_its_one_key():
    key = paramiko.Ed25519Key.from_private_key_file(str(_ed25519()))
    reply = Message(sshagent.answer(request(sshagent.REQUEST_IDENTITIES), key))
    assert reply.get_byte() == bytes([sshagent.IDENTITIES_ANSWER])
    assert reply.get_int() == 1 and reply.get_binary() == key.asbytes()


def test_it_signs_with_the_algorithm_asked_for():
    key = paramiko.RSAKey.generate(2048)
    for flags, algorithm in ((2, "rsa-sha2-256"), (4, "rsa-sha2-512")):
        reply = Message(sshagent.answer(request(sshagent.SIGN_REQUEST, key.asbytes(), b"data",
                                                flags=flags), key))
        assert reply.get_byte() == bytes([sshagent.SIGN_RESPONSE])
        signature = Message(reply.get_binary())
        assert signature.get_text() == algorithm
        signature.rewind()
        assert key.verify_ssh_sig(b"data", signature)


def test_it_refuses_other_keys_sha1_and_other_requests():
    key, other = paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)
    refused = bytes([sshagent.FAILURE])
    assert sshagent.answer(request(sshagent.SIGN_REQUEST, key.asbytes(), b"x", flags=0),
                           key) == refused   # ssh-rsa: SHA-1, which paramiko no longer signs
    assert sshagent.answer(request(sshagent.SIGN_REQUEST, other.asbytes(), b"x", flags=0),
                           key) == refused
    assert sshagent.answer(struct.pack(">B", 17), key) == refused   # add an identity


def _ed25519():
    import subprocess
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path
