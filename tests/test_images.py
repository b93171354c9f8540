"""
Images on the client's behalf, with real loopback servers: what is fetched,
what is refused (and that a refused URL never opens a connection), redirects,
the neutral error, the per-request cap and the bounded concurrency; and the
formats: read from the bytes, converted to PNG, or refused by name.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import pytest_twisted
from attrs import evolve
from PIL import Image
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from oproxy.config import ImagesConfig
from oproxy.fetch_guard import MalformedURL, RefusedAddress
from oproxy.images import formats
from oproxy.images.fetch import FetchFailed, Images
from tests.conftest import Proxy
from tests.httputil import post_json


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


PICTURE = Image.new("RGB", (3, 2), (200, 30, 30))
PNG = encoded(PICTURE, "PNG")
JPEG = encoded(PICTURE, "JPEG")
WEBP = encoded(PICTURE, "WEBP")
GIF = encoded(PICTURE.convert("P"), "GIF")
BMP = encoded(PICTURE, "BMP")
TIFF = encoded(PICTURE, "TIFF")
AVIF_HEAD = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64


def is_png_of_picture(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.format == "PNG" and image.size == PICTURE.size


# -- a loopback image server that counts its connections ------------------------------


class CountingSite(Site):
    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class ImageResource(Resource):
    """Images, redirects, errors, and requests held until released."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[bytes] = []
        self.held: list[Request] = []
        self.most_held = 0

    def render_GET(self, request: Request) -> bytes | int:
        self.hosts.append(request.getHeader(b"host") or b"")
        path = request.path.decode()
        if path.startswith("/redirect/"):
            request.setResponseCode(302)
            target = request.args.get(b"to", [b"/cat.png"])[0]
            request.setHeader(b"location", target)
            return b"moved"
        if path == "/hold":
            self.held.append(request)
            self.most_held = max(self.most_held, len(self.held))
            return NOT_DONE_YET
        bodies = {
            "/cat.png": (PNG, b"image/png"),
            "/cat.gif": (GIF, b"image/gif"),
            "/cat.webp": (WEBP, b"application/octet-stream"),
            "/cat.avif": (AVIF_HEAD, b"image/avif"),
            "/big.png": (PNG + b"\x00" * 4096, b"image/png"),
            "/data.json": (b'{"secret": 1}', b"application/json"),
        }
        if path not in bodies:
            request.setResponseCode(403 if path == "/forbidden" else 404)
            return b"no"
        body, content_type = bodies[path]
        request.setHeader(b"content-type", content_type)
        return body

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.setHeader(b"content-type", b"image/png")
            request.write(PNG)
            request.finish()


@dataclass
class Server:
    resource: ImageResource
    site: CountingSite
    port: Any
    host: str

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.number}{path}"


def start_server(interface: str = "127.0.0.1") -> Server:
    resource = ImageResource()
    site = CountingSite(resource)
    port = reactor.listenTCP(0, site, interface=interface)
    host = f"[{interface}]" if ":" in interface else interface
    return Server(resource, site, port, host)


@pytest.fixture
def server() -> Iterator[Server]:
    running = start_server()
    yield running
    pytest_twisted.blockon(running.port.stopListening())


@pytest.fixture
def server6() -> Iterator[Server]:
    try:
        running = start_server("::1")
    except Exception:
        pytest.skip("no IPv6 loopback here")
    yield running
    pytest_twisted.blockon(running.port.stopListening())


@implementer(IHostnameResolver)
@dataclass
class StubResolver:
    """Names to the addresses a test chooses; counts the lookups."""

    answers: dict[str, list[str]]
    asked: list[str] = field(default_factory=list)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        self.asked.append(hostName)
        resolutionReceiver.resolutionBegan(None)  # type: ignore[arg-type]
        for answer in self.answers.get(hostName, []):
            kind = IPv6Address if ":" in answer else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", answer, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


def images_with(answers: dict[str, list[str]] | None = None) -> tuple[Images, StubResolver]:
    resolver = StubResolver(answers or {})
    return Images(reactor, resolver=resolver), resolver


async def fetch_fails(images: Images, url: str, config: ImagesConfig) -> None:
    with pytest.raises((MalformedURL, RefusedAddress, FetchFailed)):
        await images.fetch(url, config)


# -- the guard, on real sockets -------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "0177.1",
    "0x7f.1",
    "0",
    "127.000.000.001",
    "127。0。0。1",
    "①②⑦.0.0.1",
    "127.0.0.1",
    "%31%32%37.0.0.1",
    "[::ffff:127.0.0.1]",
]


@pytest_twisted.ensureDeferred
async def test_no_spelling_of_loopback_opens_a_connection(server: Server) -> None:
    images, resolver = images_with()
    for spelling in LOOPBACK_SPELLINGS:
        await fetch_fails(images, server.url("/cat.png", spelling), ImagesConfig())
    assert server.site.connections == 0
    assert resolver.asked == []  # addresses are never looked up


@pytest_twisted.ensureDeferred
async def test_names_that_resolve_to_private_addresses_are_refused(server: Server) -> None:
    private = ["10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "169.254.169.254"]
    private += ["fd00::1", "127.0.0.1", "0.0.0.0", "::1"]
    answers = {f"h{i}.example": [address] for i, address in enumerate(private)}
    answers["mixed.example"] = ["93.184.216.34", "127.0.0.1"]
    images, resolver = images_with(answers)
    for name in answers:
        await fetch_fails(images, server.url("/cat.png", name), ImagesConfig())
    assert server.site.connections == 0
    assert sorted(resolver.asked) == sorted(answers)


@pytest_twisted.ensureDeferred
async def test_an_allowed_name_is_fetched_from_its_one_vetted_address(server: Server) -> None:
    images, resolver = images_with({"lan-cam.home": ["127.0.0.1"]})
    config = ImagesConfig(allow_hosts=("lan-cam.home",))
    data = await images.fetch(server.url("/cat.png", "lan-cam.home"), config)
    assert data == PNG
    assert resolver.asked == ["lan-cam.home"]  # one lookup: no second answer to trust
    assert server.site.connections == 1
    assert server.resource.hosts == [f"lan-cam.home:{server.number}".encode()]


@pytest_twisted.ensureDeferred
async def test_an_allowed_network_is_fetched_from(server: Server) -> None:
    images, _ = images_with()
    config = ImagesConfig(allow_hosts=("127.0.0.0/8",))
    assert await images.fetch(server.url("/cat.png", "0x7f.1"), config) == PNG
    assert server.resource.hosts == [f"127.0.0.1:{server.number}".encode()]


@pytest_twisted.ensureDeferred
async def test_allow_private_networks_turns_the_guard_off(server: Server) -> None:
    images, _ = images_with()
    config = ImagesConfig(allow_private_networks=True)
    assert await images.fetch(server.url("/cat.png"), config) == PNG


@pytest_twisted.ensureDeferred
async def test_redirects_are_checked_hop_by_hop(server: Server, server6: Server) -> None:
    images, resolver = images_with({"public.example": ["127.0.0.1"]})
    config = ImagesConfig(allow_hosts=("public.example",))
    # Followed within the allowed host, relative Location included.
    relative = server.url("/redirect/?to=/cat.png", "public.example")
    assert await images.fetch(relative, config) == PNG
    before = server.site.connections
    for target in [
        server.url("/cat.png"),
        server.url("/cat.png", "2130706433"),
        server6.url("/cat.png"),
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
    ]:
        hop = server.url(f"/redirect/?to={target}", "public.example")
        await fetch_fails(images, hop, config)
    # Only the first hop of each connected; the loopback targets never did.
    assert server.site.connections == before + 5
    assert server6.site.connections == 0
    assert set(resolver.asked) == {"public.example"}


@pytest_twisted.ensureDeferred
async def test_redirects_are_capped(server: Server) -> None:
    images, _ = images_with()
    config = ImagesConfig(allow_hosts=("127.0.0.1/32",), max_redirects=2)
    url = server.url("/cat.png")
    for _ in range(2):
        url = server.url(f"/redirect/?to={url}")
    assert await images.fetch(url, config) == PNG
    url = server.url(f"/redirect/?to={url}")
    await fetch_fails(images, url, config)
    await fetch_fails(images, url, evolve(config, max_redirects=0))


# -- through the proxy ------------------------------------------------------------------


def chat(*urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Describe"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": "llava", "messages": [{"role": "user", "content": parts}]}


async def chat_error(proxy: Proxy, body: dict[str, Any]) -> dict[str, Any]:
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 400, raw
    error: dict[str, Any] = orjson.loads(raw)["error"]
    return error


def sent_images(proxy: Proxy) -> list[bytes]:
    sent = [b for p, b in proxy.fake.stats.requests if p == "/api/chat"][-1]
    return [base64.b64decode(i) for m in sent["messages"] for i in m.get("images") or ()]


@pytest_twisted.ensureDeferred
async def test_the_reported_urls_are_400s_that_open_no_connection(
    proxy_factory: Any, server: Server
) -> None:
    proxy = proxy_factory(images=ImagesConfig())
    port = server.number
    for url in [
        *(server.url("/x.png", spelling) for spelling in LOOPBACK_SPELLINGS),
        f"http://127.0.0.1%2509:{port}/",
        f"http://[::127.0.0.1]:{port}/x",
        f"http://localhost:{port}/x.png",
    ]:
        error = await chat_error(proxy, chat(url))
        assert error["param"] == "messages.0.content.1.image_url", url
    assert server.site.connections == 0


@pytest_twisted.ensureDeferred
async def test_every_failed_fetch_reads_the_same(proxy_factory: Any, server: Server) -> None:
    """Refused, closed, 403, 404, not an image, too large, too slow: one message."""
    closed = start_server()
    closed_url = closed.url("/cat.png")
    await closed.port.stopListening()
    config = ImagesConfig(allow_hosts=("lan.example",), max_bytes=1024, timeout=0.5)
    proxy = proxy_factory(images=config)
    proxy.app.images.resolver = StubResolver({"lan.example": ["127.0.0.1"]})
    messages = set()
    for url in [
        server.url("/cat.png"),  # a private address, not allowed
        closed_url.replace("127.0.0.1", "lan.example"),
        server.url("/forbidden", "lan.example"),
        server.url("/missing.png", "lan.example"),
        server.url("/data.json", "lan.example"),
        server.url("/big.png", "lan.example"),
        server.url("/hold", "lan.example"),
    ]:
        error = await chat_error(proxy, chat(url))
        assert error["code"] == "invalid_image_url"
        messages.add(error["message"])
    server.resource.release()
    assert len(messages) == 1
    assert "could not be fetched" in messages.pop()


@pytest_twisted.ensureDeferred
async def test_images_per_request_are_capped_before_any_fetch(
    proxy_factory: Any, server: Server
) -> None:
    proxy = proxy_factory(images=ImagesConfig(allow_private_networks=True, max_per_request=3))
    inline = "data:image/png;base64," + base64.b64encode(PNG).decode()
    for urls in [[server.url("/cat.png")] * 4, [inline] * 3 + [server.url("/cat.png")]]:
        error = await chat_error(proxy, chat(*urls))
        assert error["code"] == "too_many_images"
        assert "at most 3" in error["message"]
    assert server.site.connections == 0
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), chat(*[inline] * 3))
    assert response.code == 200, raw


@pytest_twisted.ensureDeferred
async def test_fetches_run_a_few_at_a_time(proxy_factory: Any, server: Server) -> None:
    config = ImagesConfig(allow_private_networks=True, fetch_concurrency=2, timeout=60)
    proxy = proxy_factory(images=config)
    urls = [server.url(f"/hold?n={n}") for n in range(6)]
    answer = defer.ensureDeferred(
        post_json(proxy.client, proxy.v1("chat/completions"), chat(*urls))
    )
    served = 0
    while served < len(urls):
        if server.resource.held:
            served += len(server.resource.held)
            server.resource.release()
        await task.deferLater(reactor, 0.01, lambda: None)
    response, raw = await answer
    assert response.code == 200, raw
    assert server.resource.most_held == 2
    assert len(sent_images(proxy)) == 6


@pytest_twisted.ensureDeferred
async def test_fetched_images_are_read_from_their_bytes(proxy_factory: Any, server: Server) -> None:
    proxy = proxy_factory(images=ImagesConfig(allow_private_networks=True))
    body = chat(server.url("/cat.gif"), server.url("/cat.webp"))
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 200, raw
    gif, webp = sent_images(proxy)
    assert is_png_of_picture(gif)
    assert webp == WEBP  # served as application/octet-stream, read as WebP
    error = await chat_error(proxy, chat(server.url("/cat.avif")))
    assert error["code"] == "invalid_image_format"
    assert "AVIF" in error["message"]


# -- formats --------------------------------------------------------------------------


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


@pytest_twisted.ensureDeferred
async def test_gif_bmp_and_tiff_become_png(proxy: Proxy) -> None:
    # The declared type says nothing: the bytes decide.
    body = chat(data_url(GIF, "image/gif"), data_url(BMP), data_url(TIFF, "image/tiff"))
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 200, raw
    assert all(is_png_of_picture(image) for image in sent_images(proxy))


@pytest_twisted.ensureDeferred
async def test_formats_ollama_reads_pass_unchanged(proxy: Proxy) -> None:
    body = chat(data_url(PNG), data_url(JPEG, "image/jpeg"), data_url(WEBP, "image/gif"))
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 200, raw
    assert sent_images(proxy) == [PNG, JPEG, WEBP]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (AVIF_HEAD, "AVIF format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG format"),
        (b"\x00\x00\x01\x00" + b"\x00" * 40, "ICO format"),
        (b"hello, world", "not in a known image format"),
        (PNG[:20] + b"\x00" * 40, "not a valid PNG image"),
        (GIF[:12], "not a valid GIF image"),
        (b"\xff\xd8\xff" + b"\x00" * 10, "not a valid JPEG image"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unusable_images_are_400s_naming_the_format(
    proxy: Proxy, data: bytes, words: str
) -> None:
    error = await chat_error(proxy, chat(data_url(data)))
    assert error["param"] == "messages.0.content.1.image_url"
    assert error["code"] == "invalid_image_format"
    assert words in error["message"]
    if "format" in words:
        assert "supported: JPEG, PNG and WebP" in error["message"]


def test_decompression_bombs_are_refused_before_decoding() -> None:
    bomb = encoded(Image.new("P", (8000, 8000)), "GIF")
    assert len(bomb) < 1_000_000
    with pytest.raises(formats.UnusableImage, match="too many pixels"):
        formats.for_ollama(bomb)
    huge_png = encoded(Image.new("1", (10000, 6000)), "PNG")
    with pytest.raises(formats.UnusableImage, match="too many pixels"):
        formats.for_ollama(huge_png)


def test_a_gif_becomes_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    converted = formats.for_ollama(out.getvalue())
    assert converted is not None
    with Image.open(io.BytesIO(converted)) as image:
        assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


@pytest_twisted.ensureDeferred
async def test_conversions_run_off_the_reactor_thread() -> None:
    ran: list[str] = []

    def in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
        ran.append(f.__name__)
        return defer.succeed(f(*args))

    images = Images(reactor, run_in_thread=in_thread)
    parts = [(data_url(GIF), "messages.0.content.0.image_url")]
    parts.append((data_url(PNG), "messages.0.content.1.image_url"))
    ready = await images.prepare(parts, ImagesConfig())
    assert ran == ["for_ollama"]  # the GIF only; the PNG is left as is
    assert is_png_of_picture(base64.b64decode(ready[data_url(GIF)]))
    assert data_url(PNG) not in ready


# -- Ollama's native API ------------------------------------------------------------------


async def native_chat(proxy: Proxy, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response, raw = await post_json(proxy.client, f"{proxy.url}/api/chat", body)
    return response.code, orjson.loads(raw.splitlines()[0])


@pytest_twisted.ensureDeferred
async def test_native_images_are_converted_and_capped(proxy_factory: Any) -> None:
    proxy = proxy_factory(images=ImagesConfig(max_per_request=2))
    b64 = [base64.b64encode(image).decode() for image in (GIF, JPEG)]
    message = {"role": "user", "content": "Describe", "images": b64}
    body = {"model": "llava", "messages": [message], "stream": False}
    status, answer = await native_chat(proxy, body)
    assert status == 200, answer
    gif, jpeg = sent_images(proxy)
    assert is_png_of_picture(gif) and jpeg == JPEG
    message["images"] = [*b64, b64[1]]
    status, answer = await native_chat(proxy, body)
    assert status == 400 and "at most 2" in answer["error"]
    message["images"] = [base64.b64encode(AVIF_HEAD).decode()]
    status, answer = await native_chat(proxy, body)
    assert status == 400 and "AVIF" in answer["error"]


@pytest_twisted.ensureDeferred
async def test_native_generate_images_are_converted(proxy: Proxy) -> None:
    body = {"model": "llava", "prompt": "Describe", "images": [base64.b64encode(BMP).decode()]}
    response, raw = await post_json(proxy.client, f"{proxy.url}/api/generate", body)
    assert response.code == 200, raw
    sent = [b for p, b in proxy.fake.stats.requests if p == "/api/generate"][-1]
    assert is_png_of_picture(base64.b64decode(sent["images"][0]))


@pytest_twisted.ensureDeferred
async def test_a_malformed_url_is_the_clients_error_not_a_fetch_failure() -> None:
    images, resolver = images_with()
    with pytest.raises(MalformedURL):
        await images.fetch("http://[::1/x", ImagesConfig())
    assert resolver.asked == []


# -- https: the connection goes to the vetted address, TLS checks the name ----------


def certificate_for(name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) for ``name``, and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


@pytest_twisted.ensureDeferred
async def test_https_checks_the_certificate_against_the_urls_host() -> None:
    from twisted.internet import ssl

    cert_pem, key_pem = certificate_for("images.test")
    server_certificate = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    resource = ImageResource()
    port = reactor.listenSSL(
        0, CountingSite(resource), server_certificate.options(), interface="127.0.0.1"
    )
    try:
        answers = {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
        images = Images(
            reactor,
            resolver=StubResolver(answers),
            trust_root=ssl.Certificate.loadPEM(cert_pem),
        )
        config = ImagesConfig(allow_hosts=("images.test", "other.test"))
        number = port.getHost().port
        assert await images.fetch(f"https://images.test:{number}/cat.png", config) == PNG
        assert resource.hosts == [f"images.test:{number}".encode()]
        # Same address, another name: the certificate does not match.
        with pytest.raises(ResponseNeverReceived, match="DNSMismatch"):
            await images.fetch(f"https://other.test:{number}/cat.png", config)
    finally:
        await port.stopListening()
