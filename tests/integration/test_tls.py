#!/usr/bin/env python3
"""TLS: migrations with tls-creds set, and every peer TLS must refuse.

Certificates and keys are made at test time with gnutls-bin's certtool in a
session directory (never committed): CA "A" with a server certificate for
localhost / 127.0.0.1 and a client certificate (CN=client-ok), and CA "B"
with a server certificate of its own.  Objects are made over QMP with
object-add, as for QEMU, and used through migrate-set-parameters.

  x509       verify-peer on both sides, tls-authz naming the client's DN: the
             guest arrives whole (the arrival check and a fresh verify), the
             destination runs, the source is postmigrate.
  multifd    the same with 2 multifd channels, each on its own TLS session.
  psk        tls-creds-psk over unix: (no hostname there), with tls-authz
             naming the username.
  cli        `livemig guest --incoming` and `livemig migrate` with the TLS
             command-line options instead of QMP object-add.
  refusals   a plaintext source to a TLS destination, a TLS source to a
             plaintext destination, a destination whose certificate is from
             another CA, a wrong tls-hostname, a client DN and a PSK username
             that tls-authz does not list: each source ends `failed` with an
             error-desc that names the cause and keeps running (writes go
             on, memory verifies); each destination exits 1 naming the
             cause and never ran.

Skipped as a whole, with the reason, when certtool is missing.
"""

import os
import shutil
import subprocess
import time

import lmtest
from lmtest import check_dst_failed
from lmtest import (PAGE_SIZE, check, check_destination, check_runstate, check_source_done,
                    check_verified, check_writes_advance, describe_exit, free_tcp_port,
                    mem_bytes, note, test, wait_incoming_exit, wait_listening,
                    wait_migration, wait_until)

import re

MEM = "64M"
PAGES = mem_bytes(MEM) // PAGE_SIZE
DIRTY_RATE = 2000
FAIL_BOUND_S = 20
CLIENT_DN = "CN=client-ok,O=livemig test"
PSK_KEY = "9f2e4c7a1b3d5e6f708192a3b4c5d6e7"

# ----------------------------------------------------------------- certificates


def certtool(*args):
    r = subprocess.run(["certtool"] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    check(r.returncode == 0, "certtool %s failed:\n%s", " ".join(args),
          r.stdout.decode(errors="replace"))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def make_ca(d, name):
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, "ca.info"), 'cn = "%s"\nca\ncert_signing_key\nexpiration_days = 2\n'
          % name)
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", os.path.join(d, "ca-key.pem"))
    certtool("--generate-self-signed", "--load-privkey", os.path.join(d, "ca-key.pem"),
             "--template", os.path.join(d, "ca.info"), "--outfile", os.path.join(d, "ca-cert.pem"))


def make_cert(ca, out, who, template):
    """out/<who>-cert.pem and out/<who>-key.pem signed by CA dir `ca`, and
    out/ca-cert.pem: the CA the side trusts (QEMU's file names)."""
    os.makedirs(out, exist_ok=True)
    info = os.path.join(out, who + ".info")
    write(info, template)
    key = os.path.join(out, who + "-key.pem")
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", key)
    certtool("--generate-certificate", "--load-privkey", key,
             "--load-ca-certificate", os.path.join(ca, "ca-cert.pem"),
             "--load-ca-privkey", os.path.join(ca, "ca-key.pem"),
             "--template", info, "--outfile", os.path.join(out, who + "-cert.pem"))
    shutil.copy(os.path.join(ca, "ca-cert.pem"), os.path.join(out, "ca-cert.pem"))


SERVER_T = ('organization = "livemig test"\ncn = "localhost"\ndns_name = "localhost"\n'
            'ip_address = "127.0.0.1"\ntls_www_server\nencryption_key\nsigning_key\n'
            'expiration_days = 2\n')
CLIENT_T = ('organization = "livemig test"\ncn = "client-ok"\ntls_www_client\n'
            'encryption_key\nsigning_key\nexpiration_days = 2\n')


def pki():
    """The session's certificates, made once: {name: dir}."""
    if "pki" in lmtest.shared:
        return lmtest.shared["pki"]
    if shutil.which("certtool") is None:
        lmtest.skip("certtool not found (Debian package gnutls-bin; scripts/setup.sh "
                    "--test-deps installs it)")
    base = os.path.join(lmtest.session_dir(), "pki")
    dirs = {k: os.path.join(base, k) for k in ("caA", "caB", "server", "client", "serverB",
                                               "psk", "psk-other")}
    make_ca(dirs["caA"], "livemig test CA A")
    make_ca(dirs["caB"], "livemig test CA B")
    make_cert(dirs["caA"], dirs["server"], "server", SERVER_T)
    make_cert(dirs["caA"], dirs["client"], "client", CLIENT_T)
    make_cert(dirs["caB"], dirs["serverB"], "server", SERVER_T)
    for k, user in (("psk", "qemu"), ("psk-other", "intruder")):
        os.makedirs(dirs[k], exist_ok=True)
        write(os.path.join(dirs[k], "keys.psk"), "%s:%s\n" % (user, PSK_KEY))
    # The server knows both usernames; tls-authz decides.
    os.makedirs(os.path.join(base, "psk-server"), exist_ok=True)
    dirs["psk-server"] = os.path.join(base, "psk-server")
    write(os.path.join(dirs["psk-server"], "keys.psk"),
          "qemu:%s\nintruder:%s\n" % (PSK_KEY, PSK_KEY))
    lmtest.shared["pki"] = dirs
    return dirs


# ----------------------------------------------------------------- helpers


def tcp_uri():
    return "tcp:127.0.0.1:%d" % free_tcp_port("127.0.0.1")


def x509(g, id_, d, endpoint, verify=True):
    g.cmd("object-add", {"qom-type": "tls-creds-x509", "id": id_, "dir": d,
                         "endpoint": endpoint, "verify-peer": verify})


def psk(g, id_, d, endpoint, username=None):
    args = {"qom-type": "tls-creds-psk", "id": id_, "dir": d, "endpoint": endpoint}
    if username:
        args["username"] = username
    g.cmd("object-add", args)


def authz(g, id_, identity):
    g.cmd("object-add", {"qom-type": "authz-simple", "id": id_, "identity": identity})


def tls_params(g, creds, hostname=None, authz_id=None, channels=None):
    params = {"tls-creds": creds}
    if hostname is not None:
        params["tls-hostname"] = hostname
    if authz_id is not None:
        params["tls-authz"] = authz_id
    if channels:
        g.set_caps(multifd=True)
        params["multifd-channels"] = channels
    g.cmd("migrate-set-parameters", params)
    got = g.cmd("query-migrate-parameters")
    check(got.get("tls-creds") == creds, "%s: tls-creds %r after set %r", g.name,
          got.get("tls-creds"), creds)


def new_pair(env, channels=None):
    dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate=DIRTY_RATE)
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE)
    if channels:
        for g in (src, dst):
            g.set_caps(multifd=True)
            g.cmd("migrate-set-parameters", {"multifd-channels": channels})
    wait_until(lambda: src.info()["writes"] >= 200, 30, "the source's writers to dirty")
    return src, dst


def migrate_ok(src, dst, uri):
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    t0 = time.monotonic()
    src.cmd("migrate", {"uri": uri})
    info = wait_migration(src, timeout=120)
    note("migrated in %.2f s, total-time %s ms, transferred %d KiB" % (
        time.monotonic() - t0, info.get("total-time"),
        (info.get("ram") or {}).get("transferred", 0) >> 10))
    check_source_done(src, info)
    check_destination(dst, PAGES, dirtying=True)
    return info




def check_src_failed(src, pattern):
    """The source's migration failed naming the cause; its guest runs on."""
    info = wait_migration(src, until=("failed",), timeout=FAIL_BOUND_S)
    desc = info.get("error-desc") or ""
    note("source: %s" % desc)
    check(re.search(pattern, desc) is not None, "source error-desc %r does not match %r",
          desc, pattern)
    check_runstate(src, "running")
    check_writes_advance(src)
    check_verified(src, PAGES, cached=False)


def refused(env, src_setup, dst_setup, src_pat, dst_pat, uri=None, channels=None):
    src, dst = new_pair(env, channels)
    uri = uri or tcp_uri()
    dst_setup(dst)
    src_setup(src)
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    src.cmd("migrate", {"uri": uri})
    check_dst_failed(dst, dst_pat)
    check_src_failed(src, src_pat)


# ----------------------------------------------------------------- successes


@test("x509 with verify-peer and tls-authz")
def t_x509(env):
    d = pki()
    src, dst = new_pair(env)
    x509(dst, "tls0", d["server"], "server")
    authz(dst, "auth0", CLIENT_DN)
    tls_params(dst, "tls0", authz_id="auth0")
    x509(src, "tls0", d["client"], "client")
    tls_params(src, "tls0")
    migrate_ok(src, dst, tcp_uri())


@test("postcopy with preempt over x509: the preempt channel has its own session")
def t_postcopy(env):
    d = pki()
    dst = env.guest("dst", mem=MEM, incoming="defer", dirty_rate="max", pattern="sequential")
    src = env.guest("src", mem=MEM, dirty_rate="max", pattern="sequential")
    for g in (src, dst):
        g.set_caps(postcopy_ram=True, postcopy_preempt=True)
    x509(dst, "tls0", d["server"], "server")
    tls_params(dst, "tls0")
    x509(src, "tls0", d["client"], "client")
    tls_params(src, "tls0")
    # precopy cannot finish at 64 MiB/s with a 1 ms limit: only postcopy does
    src.cmd("migrate-set-parameters", {"downtime-limit": 1, "max-bandwidth": 64 << 20})
    uri = tcp_uri()
    dst.cmd("migrate-incoming", {"uri": uri})
    wait_listening(uri, dst)
    wait_until(lambda: src.info()["writes"] >= 1000, 30, "the source's writers to dirty")
    src.cmd("migrate", {"uri": uri})
    wait_until(lambda: (src.query_migrate().get("ram") or {}).get("dirty-sync-count", 0) >= 2,
               60, "two dirty syncs")
    src.cmd("migrate-start-postcopy")
    info = wait_migration(src, timeout=120)
    check((info.get("ram") or {}).get("postcopy-bytes", 0) > 0, "no postcopy phase: %r",
          info.get("ram"))
    check_destination(dst, PAGES, dirtying=True)
    dinfo = dst.query_migrate()
    note("postcopy over TLS: %s requests, fault p50 %s us, p99 %s us" % (
        dinfo.get("x-postcopy-requests"), dinfo.get("x-postcopy-latency-p50-us"),
        dinfo.get("x-postcopy-latency-p99-us")))


@test("x509 with 2 multifd channels")
def t_multifd(env):
    d = pki()
    src, dst = new_pair(env, channels=2)
    x509(dst, "tls0", d["server"], "server")
    tls_params(dst, "tls0")
    x509(src, "tls0", d["client"], "client")
    tls_params(src, "tls0", hostname="localhost")
    info = migrate_ok(src, dst, tcp_uri())
    check((info.get("ram") or {}).get("multifd-bytes", 0) > 0, "multifd-bytes is 0")


@test("psk over unix with tls-authz")
def t_psk(env):
    d = pki()
    src, dst = new_pair(env)
    psk(dst, "tls0", d["psk-server"], "server")
    authz(dst, "auth0", "qemu")
    tls_params(dst, "tls0", authz_id="auth0")
    psk(src, "tls0", d["psk"], "client", username="qemu")
    tls_params(src, "tls0")
    migrate_ok(src, dst, "unix:" + env.path("mig.sock"))


@test("command-line options of livemig guest and livemig migrate")
def t_cli(env):
    d = pki()
    uri = tcp_uri()
    dst = env.guest("dst", mem=MEM, incoming=uri, dirty_rate=DIRTY_RATE,
                    extra=["--tls-x509", d["server"], "--tls-authz", CLIENT_DN])
    got = dst.cmd("query-migrate-parameters")
    check(got.get("tls-creds") == "tls0" and got.get("tls-authz") == "authz0",
          "destination parameters after --tls-*: %r", got)
    wait_listening(uri, dst)
    src = env.guest("src", mem=MEM, dirty_rate=DIRTY_RATE)
    wait_until(lambda: src.info()["writes"] >= 200, 30, "the source's writers to dirty")
    r = subprocess.run([env.livemig, "migrate", "--qmp", src.qmp_path, "--tls-x509",
                        d["client"], "--tls-hostname", "localhost", "--timeout", "120", uri],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150)
    out = r.stdout.decode(errors="replace")
    check(r.returncode == 0, "livemig migrate exited %d:\n%s", r.returncode, out)
    check("Migration status: completed" in out, "livemig migrate output:\n%s", out)
    got = src.cmd("query-migrate-parameters")
    check(got.get("tls-creds") == "tls0" and got.get("tls-hostname") == "localhost",
          "source parameters after livemig migrate --tls-*: %r", got)
    check_source_done(src, src.query_migrate())
    check_destination(dst, PAGES, dirtying=True)
    # bad combinations are usage errors (exit 2) that say why
    for args, pat in ((["--tls-x509", d["client"], "--tls-psk", d["psk"]], "exclude"),
                      (["--tls-authz", "x", "--tls-x509", d["client"]], "--tls-authz is for"),
                      (["--tls-verify-peer", "maybe"], "on or off")):
        r = subprocess.run([env.livemig, "migrate", "--qmp", src.qmp_path] + args + [uri],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        out = r.stdout.decode(errors="replace")
        check(r.returncode == 2 and pat in out, "livemig migrate %s: exit %d:\n%s",
              " ".join(args), r.returncode, out)


@test("object-add errors and object-del")
def t_objects(env):
    d = pki()
    g = env.guest("g", mem="16M")
    for args, pat in (
            ({"qom-type": "tls-creds-x509", "id": "a", "dir": env.path("none"),
              "endpoint": "server"}, r"none/ca-cert\.pem: No such file"),
            ({"qom-type": "tls-creds-x509", "id": "a", "dir": d["client"],
              "endpoint": "server"}, r"server-cert\.pem"),
            ({"qom-type": "tls-creds-x509", "id": "a", "dir": d["server"],
              "endpoint": "sideways"}, r"endpoint"),
            ({"qom-type": "tls-creds-psk", "id": "a", "dir": d["psk"],
              "endpoint": "client", "username": "nobody"}, r"no key for username 'nobody'"),
            ({"qom-type": "tls-creds-x509", "id": "a", "dir": d["server"],
              "bogus": 1}, r"Property 'tls-creds-x509\.bogus' not found"),
            ({"qom-type": "memory-backend-ram", "id": "a"}, r"qom-type")):
        try:
            g.cmd("object-add", args)
        except lmtest.QMPError as e:
            check(re.search(pat, e.desc), "object-add %r: %r does not match %r", args, e.desc,
                  pat)
            continue
        raise lmtest.TestFailure("object-add %r succeeded" % args)
    x509(g, "t", d["server"], "server")
    try:
        x509(g, "t", d["server"], "server")
        raise lmtest.TestFailure("a duplicate id was accepted")
    except lmtest.QMPError as e:
        check("duplicate" in e.desc, "duplicate id: %r", e.desc)
    # a migration naming a deleted or a wrong-endpoint object is refused at once
    g.cmd("object-del", {"id": "t"})
    g.cmd("migrate-set-parameters", {"tls-creds": "t"})
    try:
        g.cmd("migrate", {"uri": tcp_uri()})
        raise lmtest.TestFailure("migrate with a deleted tls-creds object started")
    except lmtest.QMPError as e:
        check("no TLS credentials object with id 't'" in e.desc, "deleted object: %r", e.desc)
    x509(g, "t", d["server"], "server")
    try:
        g.cmd("migrate", {"uri": tcp_uri()})
        raise lmtest.TestFailure("migrate with server credentials started")
    except lmtest.QMPError as e:
        check("endpoint 'server'" in e.desc, "wrong endpoint: %r", e.desc)
    g.cmd("migrate-set-parameters", {"tls-creds": ""})
    check_runstate(g, "running")


# ----------------------------------------------------------------- refusals


@test("refused: a plaintext source to a TLS destination")
def t_plain_src(env):
    d = pki()

    def dst_setup(dst):
        x509(dst, "tls0", d["server"], "server")
        tls_params(dst, "tls0")
    refused(env, lambda s: None, dst_setup,
            r"destination answered with a TLS alert: it requires TLS",
            r"TLS is required .* plaintext migration stream")


@test("refused: a TLS source to a plaintext destination")
def t_plain_dst(env):
    d = pki()

    def src_setup(src):
        x509(src, "tls0", d["client"], "client")
        tls_params(src, "tls0")
    refused(env, src_setup, lambda g: None,
            r"closed the connection during the TLS handshake|TLS.*closed the connection during",
            r"starts with a TLS handshake .*the source uses TLS, but tls-creds is not set here")


@test("refused: a TLS source to a plaintext multifd destination")
def t_plain_dst_multifd(env):
    d = pki()

    def src_setup(src):
        x509(src, "tls0", d["client"], "client")
        tls_params(src, "tls0")
    refused(env, src_setup, lambda g: None,
            r"closed the connection during the handshake",
            r"starts a TLS handshake: the source uses TLS, but tls-creds is not set here",
            channels=2)


@test("refused: the destination's certificate is from another CA")
def t_other_ca(env):
    d = pki()

    def dst_setup(dst):
        x509(dst, "tls0", d["serverB"], "server")
        tls_params(dst, "tls0")

    def src_setup(src):
        x509(src, "tls0", d["client"], "client")
        tls_params(src, "tls0")
    refused(env, src_setup, dst_setup,
            r"destination's certificate is refused .*issuer is unknown",
            r"TLS: the source refused the handshake \(alert")


@test("refused: a wrong tls-hostname")
def t_hostname(env):
    d = pki()

    def dst_setup(dst):
        x509(dst, "tls0", d["server"], "server")
        tls_params(dst, "tls0")

    def src_setup(src):
        x509(src, "tls0", d["client"], "client")
        tls_params(src, "tls0", hostname="wrong.example")
    refused(env, src_setup, dst_setup,
            r"expected hostname 'wrong\.example'.*does not match",
            r"TLS: the source refused the handshake \(alert")


@test("refused: a client DN that tls-authz does not list")
def t_authz_x509(env):
    d = pki()

    def dst_setup(dst):
        x509(dst, "tls0", d["server"], "server")
        authz(dst, "auth0", "CN=someone-else,O=livemig test")
        tls_params(dst, "tls0", authz_id="auth0")

    def src_setup(src):
        x509(src, "tls0", d["client"], "client")
        tls_params(src, "tls0")
    refused(env, src_setup, dst_setup,
            r"ended the TLS session \(alert: Access was denied\)",
            r"client identity 'CN=client-ok,O=livemig test' is not allowed by tls-authz 'auth0'")


@test("refused: a PSK username that tls-authz does not list")
def t_authz_psk(env):
    d = pki()

    def dst_setup(dst):
        psk(dst, "tls0", d["psk-server"], "server")
        authz(dst, "auth0", "qemu")
        tls_params(dst, "tls0", authz_id="auth0")

    def src_setup(src):
        psk(src, "tls0", d["psk-other"], "client", username="intruder")
        tls_params(src, "tls0")
    refused(env, src_setup, dst_setup,
            r"ended the TLS session \(alert: Access was denied\)",
            r"client identity 'intruder' is not allowed by tls-authz 'auth0'")


if __name__ == "__main__":
    lmtest.main()
