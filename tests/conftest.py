from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The session's own ``$XDG_CACHE_HOME``: what the commands remember (the CPU dtype choice, model baselines)
    goes there, not into the user's ``~/.cache``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def trainticket_corpus(tmp_path_factory):
    """The whole nezha-trainticket set built into a corpus once per session: (directory, BuildResult)."""
    src = SHARED / "nezha-trainticket" / "traces"
    if not src.is_dir():
        pytest.skip("../shared/datasets/nezha-trainticket not present")
    from otel_tracegen.dataset import build_corpus

    out = tmp_path_factory.mktemp("trainticket") / "corpus"
    return out, build_corpus("spancsv", [src], out)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The shipped TrainTicket excerpt (examples/trainticket) built into a corpus once per session."""
    from otel_tracegen.dataset import build_corpus

    from .cli_helpers import EXAMPLES

    out = tmp_path_factory.mktemp("examples") / "corpus"
    build_corpus("spancsv", [EXAMPLES], out)
    return out


@pytest.fixture(scope="session")
def pretrained(corpus, tmp_path_factory) -> Path:
    """A tiny model pre-trained on ``corpus`` (20 steps, one thread), once per session. Read it, or copy it first."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from otel_tracegen.cli import ExitStatus

    from .cli_helpers import FAST, run

    out = tmp_path_factory.mktemp("tiny") / "model"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, _, err = run("train", "--stage", "pretrain", "--corpus", str(corpus), "--out", str(out), "--config",
                         "tiny", "--max-steps", "20", "--eval-every", "10", "--lr", "3e-3", *FAST)
    finally:
        torch.set_num_threads(before)
    assert rc == ExitStatus.SUCCESS, err
    return out


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))  # fmt: skip
        return subject, key

    ca_name, ca_key = issue("ca", ca=True)
    issue("server", ca_name, ca_key, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    issue("client", ca_name, ca_key)
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
