"""How a URL is shown: whatever its shape (user info, a presigned query, a fragment, an IPv6 or malformed
host, a bad port), the shown form holds no secret and still names the host and path; a URL with nothing
to hide, and any path that is not a URL, stays byte for byte as written."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from prep.formats.urls import REDACTED, needs_redacting, redact_url, redact_urls_in, scrub_url

SECRET = "SECRETSIG123"
_SEGMENT = st.text(alphabet="aZ09_-.~%@:=,;é", min_size=1, max_size=8)
_HOSTS = st.sampled_from(["example.com", "Bucket.S3.Amazonaws.com", "127.0.0.1", "[::1]", "[fe80::1",
                          "h%zz", ""])
_PORTS = st.sampled_from(["", ":8080", ":99999", ":abc", ":"])


@st.composite
def urls(draw) -> tuple[str, str, bool]:
    """(url, its host and path as written, whether it holds a secret)"""
    scheme = draw(st.sampled_from(["http", "https", "s3", "gs", "HTTP"]))
    user = draw(st.sampled_from(["", "user@", f"user:{SECRET}@", f"{SECRET}@"]))
    host = draw(_HOSTS) + draw(_PORTS)
    path = "".join("/" + s for s in draw(st.lists(_SEGMENT, max_size=4)))
    query = draw(st.sampled_from(["", f"?X-Amz-Credential=AKID%2F1%2Fs3&X-Amz-Signature={SECRET}",
                                  f"?sig={SECRET}&a=/b@c", "?"]))
    fragment = draw(st.sampled_from(["", f"#access_token={SECRET}"]))
    return f"{scheme}://{user}{host}{path}{query}{fragment}", path, bool(user or query or fragment)


@given(urls())
@example(("http://user:SECRETSIG123@[::1]:8080/a/b.jpg?sig=SECRETSIG123", "/a/b.jpg", True))
@example(("http://127.0.0.1:99999/x.jpg?X-Amz-Signature=SECRETSIG123", "/x.jpg", True))
def test_a_shown_url_holds_no_secret_and_names_its_path(case: tuple[str, str, bool]) -> None:
    url, path, hides = case
    shown = redact_url(url)  # never raises, whatever the URL
    assert SECRET not in shown and shown.endswith(path)
    assert shown.lower().startswith(url.split(":", 1)[0].lower())  # the scheme, in lower case
    assert needs_redacting(url) == hides
    for text in (f"GET {url} failed", f"404, message='Not Found', url=URL('{url}')", f'"{url}"', url):
        assert SECRET not in redact_urls_in(text)
        # only the URL changed; one with nothing to hide is kept as written (no case folding)
        assert redact_urls_in(text) == (text.replace(url, shown) if hides else text)


@given(st.text(alphabet="aZ09 _-./?#@:é", max_size=30))
def test_paths_are_not_urls_and_stay_as_written(path: str) -> None:
    if "://" not in path:
        assert not needs_redacting(path) and redact_url(path) == path and redact_urls_in(path) == path


def test_pipe_commands_show_only_the_program() -> None:
    assert redact_url(f"pipe:curl -H 'Authorization: {SECRET}' https://h/x.tar") == "pipe:curl"
    assert needs_redacting("pipe:curl -s x") and not needs_redacting("pipe:cat")


_INNOCENT = st.lists(st.sampled_from(["width=500", "v=2", "format=jpg", "a=/b@c", "se=2030-01-01", "flag",
                                      "x=", "sp=r"]), max_size=3)
_CREDENTIALS = st.sampled_from([
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature", "sig", "x-goog-signature",
    "GoogleAccessId", "Key-Pair-Id", "Policy", "token", "access_token", "api_key", "client_secret",
    "auth_token", "X%2DAmz%2DSignature",
])


@given(urls(), _INNOCENT, st.lists(_CREDENTIALS, max_size=2), st.randoms())
def test_a_recorded_url_loses_its_credentials_and_keeps_everything_else(case, innocent, secret_names, rnd):
    """scrub_url (what download_images records): no credential survives, whatever the URL's shape,
    and the URL minus those values is the URL as written, innocent parameters and their order kept."""
    url, _, _ = case
    params = [f"{n}={SECRET}" for n in secret_names] + innocent
    rnd.shuffle(params)
    if params:
        url = url.split("#")[0] + ("&" if "?" in url else "?") + "&".join(params)
    scrubbed = scrub_url(url)
    assert SECRET not in scrubbed
    expected = url.replace(SECRET, REDACTED).replace("AKID%2F1%2Fs3", REDACTED)  # the key id too
    authority = url.partition("://")[2].split("/")[0].split("?")[0].split("#")[0]
    if "@" in authority:  # user info goes whole (a token may be the user name)
        expected = expected.replace(authority.replace(SECRET, REDACTED).rpartition("@")[0], REDACTED, 1)
    assert scrubbed == expected
    for p in innocent:
        assert p in scrubbed.split("?", 1)[1].split("&")


def test_a_url_with_nothing_secret_is_recorded_as_written() -> None:
    for url in ("https://i.pinimg.com/x.jpg?v=2&width=500", "http://h/a%20b.jpg#top", "a/b.jpg",
                "https://h/x?sv=2020-08-04&se=2030&sp=r&sig="):
        assert scrub_url(url) == url
