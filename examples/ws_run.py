#!/usr/bin/env python3
"""Stream a ctrl-exec run over GET /ws/run, Python standard library only.

Usage: ws_run.py HOST:PORT '{"hosts":["web-01"],"script":"hello"}' [TOKEN]
"""
import base64, json, os, socket, struct, sys

def frame(opcode, payload):                     # client frames must be masked
    mask, n = os.urandom(4), len(payload)
    size = (bytes([0x80 | n]) if n < 126 else bytes([0xFE]) + struct.pack("!H", n)
            if n < 65536 else bytes([0xFF]) + struct.pack("!Q", n))
    return bytes([0x80 | opcode]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

host, port = sys.argv[1].rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
# https API: sock = ssl.create_default_context(cafile="api-ca.crt").wrap_socket(sock, server_hostname=host)
auth = "Authorization: Bearer %s\r\n" % sys.argv[3] if len(sys.argv) > 3 else ""
sock.sendall(("GET /ws/run HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
              % (sys.argv[1], base64.b64encode(os.urandom(16)).decode(), auth)).encode())
f, failed = sock.makefile("rb"), False
status, headers = f.readline().decode(), {}
for line in iter(lambda: f.readline().decode().strip(), ""):
    headers[line.split(":")[0].lower()] = line.split(":", 1)[1].strip()
if " 101 " not in status:                       # refused before the upgrade (403, 426, 503)
    sys.exit(status.strip() + " " + f.read(int(headers.get("content-length", 0))).decode())
sock.sendall(frame(0x1, sys.argv[2].encode()))   # the run request: one text message
while True:
    b0, b1 = f.read(2)
    n = b1 & 0x7F
    n = struct.unpack("!H", f.read(2))[0] if n == 126 else struct.unpack("!Q", f.read(8))[0] if n == 127 else n
    data = f.read(n)
    if b0 & 0x0F == 0x8:                        # server closes after "done" or an error
        sock.sendall(frame(0x8, data[:2]))
        break
    if b0 & 0x0F == 0x9:
        sock.sendall(frame(0xA, data))          # ping -> pong
        continue
    event = json.loads(data)                    # start, stdout/stderr, exit, done, error
    if event["event"] in ("stdout", "stderr"):
        sys.stdout.write("".join("%s: %s\n" % (event["host"], l) for l in event["data"].splitlines()))
    else:
        print(json.dumps(event))
        failed = failed or event.get("ok") is False
sock.close()
sys.exit(1 if failed else 0)
