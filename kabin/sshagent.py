"""The pool's key, lent to the nodes through SSH agent forwarding.

A node whose session was opened with ``SshPool.open(..., forward_agent=True)`` can
log in to other nodes with OpenSSH's client (``ssh -A``): the client asks its
forwarded agent, which is this module, answering over the frontend's connection.
The key never leaves the frontend and is usable only while that connection is up
(chaincast's tree launch). Only the two requests a client makes are answered: list
the identities, sign with ours; everything else gets SSH_AGENT_FAILURE.
"""

import logging
import struct
import threading

log = logging.getLogger(__name__)

FAILURE, REQUEST_IDENTITIES, IDENTITIES_ANSWER, SIGN_REQUEST, SIGN_RESPONSE = 5, 11, 12, 13, 14
RSA_ALGORITHMS = {2: "rsa-sha2-256", 4: "rsa-sha2-512"}   # the sign request's flags
MAX_MESSAGE = 256 * 1024
LENGTH = struct.Struct(">I")


def serve(channel, key):
    """Answer agent requests on a forwarded ``channel`` with ``key``, in a thread."""
    threading.Thread(target=_serve, args=(channel, key), daemon=True,
                     name="kabin-ssh-agent").start()


def _serve(channel, key):
    try:
        while True:
            head = _read(channel, LENGTH.size)
            length = LENGTH.unpack(head)[0] if head else 0
            request = _read(channel, length) if 0 < length <= MAX_MESSAGE else None
            if not request:
                return
            reply = answer(request, key)
            channel.sendall(LENGTH.pack(len(reply)) + reply)
    except (OSError, EOFError, ValueError) as exc:
        log.debug("forwarded agent channel ended: %s", exc)
    finally:
        channel.close()


def answer(request, key):
    """The reply (without its length) to one agent ``request`` (without its length)."""
    from paramiko.message import Message

    reply = Message()
    if request[0] == REQUEST_IDENTITIES:
        reply.add_byte(bytes([IDENTITIES_ANSWER]))
        reply.add_int(1)
        reply.add_string(key.asbytes())
        reply.add_string("kabin")
        return reply.asbytes()
    if request[0] == SIGN_REQUEST:
        message = Message(request[1:])
        blob, data, flags = message.get_binary(), message.get_binary(), message.get_int()
        rsa = key.get_name() == "ssh-rsa"
        algorithm = RSA_ALGORITHMS.get(flags & 6) if rsa else None
        if blob == key.asbytes() and (algorithm or not rsa):   # no SHA-1 (ssh-rsa) signatures
            reply.add_byte(bytes([SIGN_RESPONSE]))
            reply.add_string(key.sign_ssh_data(data, algorithm).asbytes())
            return reply.asbytes()
    return bytes([FAILURE])


def _read(channel, count):
    """``count`` bytes, or None at the end of the channel."""
    data = b""
    while len(data) < count:
        chunk = channel.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data
