"""moto's S3 server with its buckets kept in a directory across a restart.

moto holds objects in memory; a real S3 server keeps them on disk. For the test that restarts
the server mid-run, this launcher restores the directory's buckets into moto's backend BEFORE it
starts serving (so no request sees a half-restored server) and writes them back on SIGTERM.

Usage: python moto_persistent.py HOST PORT STATE_DIR
"""
import os
import signal
import sys
import threading

from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

host, port, state = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def backend(account):
    return s3_backends[account]["global"]


if os.path.isdir(state):
    for account in os.listdir(state):
        for bucket in os.listdir(os.path.join(state, account)):
            root = os.path.join(state, account, bucket)
            backend(account).create_bucket(bucket, "us-east-1")
            for directory, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(directory, name)
                    with open(path, "rb") as f:
                        backend(account).put_object(bucket, os.path.relpath(path, root), f.read())

server = ThreadedMotoServer(ip_address=host, port=port)
server.start()


def save_and_exit(*_):
    server.stop()
    for account in list(s3_backends.keys()):
        for name, bucket in backend(account).buckets.items():
            os.makedirs(os.path.join(state, account, name), exist_ok=True)
            for key in list(bucket.keys.keys()):
                if key.endswith("/"):
                    continue
                path = os.path.join(state, account, name, key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(bucket.keys[key].value)
    os._exit(0)


signal.signal(signal.SIGTERM, save_and_exit)
threading.Event().wait()
