#!/usr/bin/env python3
"""Races POST /transfers and idle keep-alive connections against grace-demo's SIGTERM.

usage: ledger-race.py ROUNDS [PATH/TO/grace-demo] [SCRATCH_DIR]

Each round starts a release grace-demo on a fresh SQLite ledger, opens 1,500 idle
keep-alive connections and 60 clients that send transfers with unique amounts, then sends
SIGTERM at a random moment (and, in 30 % of the rounds, a second SIGTERM: a force). After
the exit it checks the database: without a force, every committed transfer was answered
2xx and every 2xx is committed; always, no 2xx is missing from the database and every idle
client saw its connection end. Needs a file-descriptor limit above 3,200.
"""
import asyncio, os, random, signal, sqlite3, subprocess, sys, json, shutil
DEMO = sys.argv[2] if len(sys.argv) > 2 else "target/release/grace-demo"
SCRATCH = sys.argv[3] if len(sys.argv) > 3 else "/tmp/ledger-race"
DEMO = os.path.abspath(DEMO)
async def req(reader, writer, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data); await writer.drain()
    line = await reader.readline()
    if not line: raise EOFError
    status = int(line.split()[1]); length = 0
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b""): break
        if h.lower().startswith(b"content-length:"): length = int(h.split(b":")[1])
    await reader.readexactly(length)
    return status
async def one_round(rnd, port):
    d = f"{SCRATCH}/r{rnd}"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
    p = subprocess.Popen([DEMO, "--listen", f"127.0.0.1:{port}", "--db", f"sqlite://{d}/db.sqlite?mode=rwc"], cwd=d, stdout=subprocess.DEVNULL, stderr=open(f"{d}/err", "w"))
    for _ in range(200):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port); break
        except OSError: await asyncio.sleep(0.05)
    assert await req(r, w, "POST", "/accounts", {"id": "a", "balance": 10**15}) in (200, 201)
    assert await req(r, w, "POST", "/accounts", {"id": "b", "balance": 0}) in (200, 201)
    idle = []
    for _ in range(1500):
        ri, wi = await asyncio.open_connection("127.0.0.1", port)
        await req(ri, wi, "GET", "/"); idle.append((ri, wi))
    answers = {}; counter = [0]; stop = [False]
    async def worker():
        try:
            rr, ww = await asyncio.open_connection("127.0.0.1", port)
        except OSError: return
        while not stop[0]:
            counter[0] += 1; amt = counter[0]
            try:
                answers[amt] = await req(rr, ww, "POST", "/transfers", {"from": "a", "to": "b", "amount": amt})
            except Exception:
                answers[amt] = None
                try:
                    rr, ww = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    return
    tasks = [asyncio.create_task(worker()) for _ in range(60)]
    await asyncio.sleep(random.uniform(0.1, 0.8))
    p.send_signal(signal.SIGTERM)
    forced = random.random() < 0.3
    if forced:
        await asyncio.sleep(random.uniform(0, 0.02)); p.send_signal(signal.SIGTERM)
    while p.poll() is None: await asyncio.sleep(0.01)
    stop[0] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    idle_closed = 0
    for ri, wi in idle:
        try:
            if await asyncio.wait_for(ri.read(1), 2) == b"": idle_closed += 1
        except Exception: pass
        wi.close()
    db = sqlite3.connect(f"{d}/db.sqlite")
    committed = {row[0] for row in db.execute("SELECT amount FROM grace_transfers")}
    ok = {a for a, s in answers.items() if s is not None and 200 <= s < 300}
    lost = committed - ok; phantom = ok - committed
    print(f"round {rnd}: {'FORCED ' if forced else ''}exit {p.returncode}, sent {len(answers)}, committed {len(committed)}, 2xx {len(ok)}, committed-unanswered {len(lost)}, 2xx-not-committed {len(phantom)}, idle closed {idle_closed}/{len(idle)}", flush=True)
    return (forced or not lost) and not phantom and idle_closed == len(idle)
async def main():
    rounds = int(sys.argv[1]); bad = 0
    for i in range(rounds):
        if not await one_round(i, 18500 + i % 50): bad += 1
    print("bad rounds:", bad)
    sys.exit(1 if bad else 0)
asyncio.run(main())
