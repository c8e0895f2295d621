"""A disk that corrupts what is written to it: one file, ``disk``, in a FUSE file system.

Run as ``python3 corrupting_disk.py MOUNTPOINT SIZE``: it serves MOUNTPOINT/disk
(SIZE bytes, stored in memory) and flips one bit in every write it takes, as
a failing disk or controller would, until unmounted. It prints "ready" once
mounted. The relay agent writes
and syncs without an error; only reading back shows the damage.
"""

import errno
import stat
import sys
import time

import fuse


class CorruptingDisk(fuse.Operations):
    def __init__(self, size):
        self.data = bytearray(size)
        self.now = time.time()

    def init(self, path):
        print("ready", flush=True)      # mounted: the caller may use the disk

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != "/disk":
            raise fuse.FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": len(self.data),
                "st_mtime": self.now, "st_ctime": self.now, "st_atime": self.now}

    def readdir(self, path, fh):
        return [".", "..", "disk"]

    def read(self, path, size, offset, fh):
        return bytes(self.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        if offset + len(data) > len(self.data):
            raise fuse.FuseOSError(errno.ENOSPC)
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        self.data[offset:offset + len(data)] = damaged
        return len(data)

    def truncate(self, path, length, fh=None):
        pass       # a disk keeps its size

    def fsync(self, path, datasync, fh):
        return 0

    def flush(self, path, fh):
        return 0


if __name__ == "__main__":
    fuse.FUSE(CorruptingDisk(int(sys.argv[2])), sys.argv[1], foreground=True)
