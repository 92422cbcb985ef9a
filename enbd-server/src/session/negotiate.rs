//! The fixed-newstyle handshake, server side: greeting, client flags, then options until the
//! client picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! Invariants: every option gets exactly one final reply (ACK or an error); option data is
//! bounded (`MAX_OPTION_DATA`) before it is buffered; malformed option data is answered with
//! NBD_REP_ERR_INVALID and the session goes on; only framing errors (bad magic, unknown client
//! flags, hostile lengths) and more than `MAX_OPTIONS` options end the connection.
//!
//! Memory: options are answered one at a time and the next one is read only once the replies
//! to the last are written, so a client that sends options without reading replies is simply
//! no longer read (and dropped when the handshake timeout in [`super::serve`] passes).
//!
//! TLS (NBD_OPT_STARTTLS): [`options`] runs once before TLS and, when the client asks for it,
//! once more over the TLS stream with a fresh option state (nothing negotiated in plain text
//! carries over). With TLS required, every option but STARTTLS and ABORT is answered
//! NBD_REP_ERR_TLS_REQD before TLS, and EXPORT_NAME (which has no error reply) ends the
//! connection. Bytes the client sent after STARTTLS but before its ACK end the connection:
//! they would otherwise be read as if they had come over TLS (plain-text injection).
//!
//! Access (`--access published`, [`crate::access`]): a client presents grant tokens with
//! ENBD_OPT_ACCESS (ACK, or NBD_REP_ERR_POLICY for a token that names no grant). LIST shows
//! only the volumes its tokens grant; INFO, GO and the meta-context options for any other
//! export get NBD_REP_ERR_POLICY, and EXPORT_NAME for one ends the connection. Like every
//! other option state, tokens presented before STARTTLS do not carry over into TLS. With
//! `--access open` ENBD_OPT_ACCESS is acknowledged without a check.

use bytes::{Buf, BytesMut};
use enbd_proto::wire::{
    BASE_ALLOCATION, BlockSizeInfo, ClientFlags, ExportInfo, Greeting, HandshakeFlags, HeaderStyle,
    InfoReply, InfoRequest, InfoType, MetaContextRequest, OptionCode, OptionError, OptionHeader,
    OptionReply, OptionReplyBody, OptionRequest, TransmissionFlags, WireError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::SessionError;
use crate::access::{Grants, Held};
use crate::export::{Export, ExportProvider, OpenError};

/// Largest option payload we buffer (export names are at most 4 KiB; queries add a little).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option payloads up to this size are read and dropped with NBD_REP_ERR_TOO_BIG; bigger
/// ones end the connection, since skipping them would cost more than the client is worth.
const MAX_SKIPPABLE_OPTION: u32 = 1 << 20;
/// Most options one handshake may send; enough for `nbdinfo --list` over a few thousand
/// exports (a LIST, then an INFO per export), far beyond what any client needs to connect.
pub const MAX_OPTIONS: usize = 16 * 1024;
/// Id of the one metadata context we serve.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled on.
pub struct Negotiated {
    pub export: Export,
    pub style: HeaderStyle,
    pub structured: bool,
    pub base_allocation: bool,
    pub flags: TransmissionFlags,
    /// The grant the export was opened with (`--access published`).
    pub grant: Option<Held>,
}

/// Options that change how transmission will look.
#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    /// Export the meta context was set for, and whether base:allocation was selected.
    meta: Option<(String, bool)>,
    /// Grants of the tokens presented so far.
    held: Vec<Held>,
}

/// Who may open what in this handshake: everything (`None`, `--access open`) or what the
/// presented tokens grant.
#[derive(Clone, Copy)]
pub struct Access<'a> {
    pub grants: Option<&'a Grants>,
}

impl Access<'_> {
    /// Whether `export` (as the client named it; the empty name is the default export) may
    /// be opened, and the grant it is opened with.
    fn permits(
        &self,
        st: &State,
        export: &str,
        provider: &dyn ExportProvider,
    ) -> Result<Option<Held>, ()> {
        if self.grants.is_none() {
            return Ok(None);
        }
        let name = if export.is_empty() {
            provider.default_export().unwrap_or_default()
        } else {
            export.to_owned()
        };
        match st
            .held
            .iter()
            .find(|h| !name.is_empty() && h.volume == name)
        {
            Some(h) => Ok(Some(h.share())),
            None => Err(()),
        }
    }
}

fn policy(option: OptionCode) -> OptionReply {
    // The same answer for a volume that exists and one that does not: an unpublished client
    // learns nothing about what the server holds.
    OptionReply::error(
        option,
        OptionError::Policy,
        "not published to this client: present an access token for this volume (ENBD_OPT_ACCESS)",
    )
}

impl State {
    fn style(&self) -> HeaderStyle {
        if self.extended {
            HeaderStyle::Extended
        } else {
            HeaderStyle::Compact
        }
    }
}

/// Reads bytes into `buf` until `decode` yields a value.
pub(crate) async fn read_frame<R, T>(
    r: &mut R,
    buf: &mut BytesMut,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, WireError>,
) -> Result<T, SessionError>
where
    R: AsyncRead + Unpin,
{
    loop {
        if let Some((v, n)) = decode(buf)? {
            buf.advance(n);
            return Ok(v);
        }
        buf.reserve(4096);
        if r.read_buf(buf).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
}

async fn discard<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    mut n: usize,
) -> Result<(), SessionError> {
    loop {
        let take = n.min(buf.len());
        buf.advance(take);
        n -= take;
        if n == 0 {
            return Ok(());
        }
        buf.reserve(n.min(65536));
        if r.read_buf(buf).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    replies: &[OptionReply],
) -> Result<(), SessionError> {
    let mut out = Vec::new();
    for r in replies {
        r.encode(&mut out)?;
    }
    w.write_all(&out).await?;
    // Over TLS the replies stay in the session until flushed.
    w.flush().await?;
    Ok(())
}

fn transmission_flags(export: &Export, st: &State) -> TransmissionFlags {
    let mut f = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_FAST_ZERO
        | TransmissionFlags::SEND_CACHE
        | TransmissionFlags::CAN_MULTI_CONN;
    if export.read_only {
        f |= TransmissionFlags::READ_ONLY;
    }
    if st.structured {
        // We always answer a READ with one chunk, so "don't fragment" holds for free.
        f |= TransmissionFlags::SEND_DF;
    }
    f
}

fn open_error(option: OptionCode, e: &OpenError) -> OptionReply {
    let code = match e {
        OpenError::NotFound(_) => OptionError::UnknownExport,
        OpenError::Unavailable(_) => OptionError::Shutdown,
        OpenError::Io { .. } => OptionError::Platform,
    };
    OptionReply::error(option, code, e.to_string())
}

fn info_replies(
    option: OptionCode,
    req: &InfoRequest,
    export: &Export,
    st: &State,
    max_request: u32,
    provider: &dyn ExportProvider,
) -> Vec<OptionReply> {
    let info = |i| OptionReply {
        option,
        body: OptionReplyBody::Info(i),
    };
    let mut out = vec![info(InfoReply::Export(ExportInfo {
        size: export.size,
        flags: transmission_flags(export, st),
    }))];
    for t in &req.requests {
        match t {
            InfoType::Name => out.push(info(InfoReply::Name(export.name.clone()))),
            InfoType::Description => {
                let d = provider
                    .list()
                    .into_iter()
                    .find(|e| e.name == export.name)
                    .map(|e| e.description);
                if let Some(d) = d {
                    out.push(info(InfoReply::Description(d)));
                }
            }
            _ => {}
        }
    }
    // Sent even when not asked for: clients that do not ask still benefit, and the spec
    // allows it.
    out.push(info(InfoReply::BlockSize(BlockSizeInfo {
        minimum: 1,
        preferred: 4096,
        maximum: max_request,
    })));
    out.push(OptionReply::ack(option));
    out
}

fn meta_replies(
    option: OptionCode,
    req: &MetaContextRequest,
    st: &mut State,
    provider: &dyn ExportProvider,
) -> Vec<OptionReply> {
    if !st.structured {
        return vec![OptionReply::error(
            option,
            OptionError::Invalid,
            "negotiate structured replies first",
        )];
    }
    if let Err(e) = provider.open(&req.export) {
        return vec![open_error(option, &e)];
    }
    let set = option == OptionCode::SetMetaContext;
    let wanted = if req.queries.is_empty() {
        !set // LIST with no query lists everything; SET with none selects nothing.
    } else {
        req.queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || q == "base:")
    };
    let mut out = Vec::new();
    if wanted {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        out.push(OptionReply {
            option,
            body: OptionReplyBody::MetaContext {
                id,
                name: BASE_ALLOCATION.into(),
            },
        });
    }
    if set {
        st.meta = Some((req.export.clone(), wanted));
    }
    out.push(OptionReply::ack(option));
    out
}

/// Where the connection stands with TLS, as the option loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// The server has no TLS: STARTTLS is unsupported.
    Unavailable,
    /// Plain text so far; STARTTLS is accepted. `required`: nothing else is, but ABORT.
    Offered { required: bool },
    /// The option phase runs over TLS already.
    Active,
}

/// How an option phase ended.
pub enum Step {
    /// An export was picked (`Some`) or the client left cleanly with NBD_OPT_ABORT (`None`).
    Done(Option<Negotiated>),
    /// STARTTLS was acknowledged: the caller runs the TLS handshake, then [`options`] again.
    StartTls,
}

/// Sends the greeting and reads the client flags; returns whether the client asked for
/// NO_ZEROES.
pub async fn greet<S>(io: &mut S, buf: &mut BytesMut) -> Result<bool, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    }
    .encode(&mut greeting);
    io.write_all(&greeting).await?;
    let client = read_frame(io, buf, ClientFlags::decode).await?;
    Ok(client.contains(ClientFlags::NO_ZEROES))
}

/// Runs the option phase until the client picks an export, leaves, or starts TLS. `left`
/// counts the options the whole handshake may still send (`MAX_OPTIONS` to begin with).
#[allow(clippy::too_many_arguments)]
pub async fn options<S>(
    io: &mut S,
    buf: &mut BytesMut,
    provider: &dyn ExportProvider,
    max_request: u32,
    no_zeroes: bool,
    tls: TlsPhase,
    access: Access<'_>,
    left: &mut usize,
) -> Result<Step, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = State::default();

    while *left > 0 {
        *left -= 1;
        let header = read_frame(io, buf, |b| OptionHeader::decode(b, u32::MAX)).await?;
        if header.length > MAX_OPTION_DATA {
            if header.length > MAX_SKIPPABLE_OPTION {
                return Err(SessionError::Protocol(WireError::TooLong {
                    what: "option data",
                    len: header.length.into(),
                    limit: MAX_SKIPPABLE_OPTION.into(),
                }));
            }
            discard(io, buf, header.length as usize).await?;
            send(
                io,
                &[OptionReply::error(
                    header.option,
                    OptionError::TooBig,
                    "option data too long",
                )],
            )
            .await?;
            continue;
        }
        // Put the header back in front of its data and decode the whole option at once.
        let data = read_frame(io, buf, |b| {
            Ok((b.len() >= header.length as usize)
                .then(|| (b[..header.length as usize].to_vec(), header.length as usize)))
        })
        .await?;
        if tls == (TlsPhase::Offered { required: true }) {
            match header.option {
                OptionCode::StartTls | OptionCode::Abort => {}
                OptionCode::ExportName => return Err(SessionError::TlsRequired),
                option => {
                    send(
                        io,
                        &[OptionReply::error(
                            option,
                            OptionError::TlsRequired,
                            "TLS is required: send NBD_OPT_STARTTLS first",
                        )],
                    )
                    .await?;
                    continue;
                }
            }
        }
        let request = match OptionRequest::parse(header.option, &data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(option = ?header.option, error = %e, "malformed option");
                send(
                    io,
                    &[OptionReply::error(
                        header.option,
                        OptionError::Invalid,
                        e.to_string(),
                    )],
                )
                .await?;
                continue;
            }
        };
        let option = header.option;
        match request {
            OptionRequest::Abort => {
                // The client may already have closed; a failed ACK does not matter.
                let _ = send(io, &[OptionReply::ack(option)]).await;
                return Ok(Step::Done(None));
            }
            OptionRequest::List => {
                let mut replies: Vec<OptionReply> = provider
                    .list()
                    .into_iter()
                    .filter(|e| {
                        access.grants.is_none() || st.held.iter().any(|h| h.volume == e.name)
                    })
                    .map(|e| OptionReply {
                        option,
                        body: OptionReplyBody::Server {
                            name: e.name,
                            details: e.description,
                        },
                    })
                    .collect();
                replies.push(OptionReply::ack(option));
                send(io, &replies).await?;
            }
            OptionRequest::StartTls => match tls {
                TlsPhase::Unavailable => {
                    send(
                        io,
                        &[OptionReply::error(
                            option,
                            OptionError::Unsupported,
                            "TLS is not enabled on this server",
                        )],
                    )
                    .await?;
                }
                TlsPhase::Active => {
                    send(
                        io,
                        &[OptionReply::error(
                            option,
                            OptionError::Invalid,
                            "TLS is already active",
                        )],
                    )
                    .await?;
                }
                TlsPhase::Offered { .. } => {
                    if !buf.is_empty() {
                        return Err(SessionError::DataBeforeTls);
                    }
                    send(io, &[OptionReply::ack(option)]).await?;
                    return Ok(Step::StartTls);
                }
            },
            OptionRequest::StructuredReply => {
                if st.extended {
                    send(
                        io,
                        &[OptionReply::error(
                            option,
                            OptionError::Invalid,
                            "extended headers already negotiated",
                        )],
                    )
                    .await?;
                } else {
                    st.structured = true;
                    st.meta = None;
                    send(io, &[OptionReply::ack(option)]).await?;
                }
            }
            OptionRequest::ExtendedHeaders => {
                st.extended = true;
                st.structured = true;
                st.meta = None;
                send(io, &[OptionReply::ack(option)]).await?;
            }
            OptionRequest::ListMetaContext(req) | OptionRequest::SetMetaContext(req) => {
                if access.permits(&st, &req.export, provider).is_err() {
                    send(io, &[policy(option)]).await?;
                    continue;
                }
                let replies = meta_replies(option, &req, &mut st, provider);
                send(io, &replies).await?;
            }
            OptionRequest::Info(req) | OptionRequest::Go(req) => {
                let Ok(grant) = access.permits(&st, &req.export, provider) else {
                    send(io, &[policy(option)]).await?;
                    continue;
                };
                let export = match provider.open(&req.export) {
                    Ok(e) => e,
                    Err(e) => {
                        send(io, &[open_error(option, &e)]).await?;
                        continue;
                    }
                };
                let replies = info_replies(option, &req, &export, &st, max_request, provider);
                send(io, &replies).await?;
                if option == OptionCode::Go {
                    let flags = transmission_flags(&export, &st);
                    let base_allocation =
                        matches!(&st.meta, Some((name, true)) if *name == req.export);
                    return Ok(Step::Done(Some(Negotiated {
                        export,
                        style: st.style(),
                        structured: st.structured,
                        base_allocation,
                        flags,
                        grant,
                    })));
                }
            }
            OptionRequest::ExportName(name) => {
                // No error reply exists for EXPORT_NAME: an unknown or unpublished export
                // ends the connection.
                let grant = access
                    .permits(&st, &name, provider)
                    .map_err(|()| SessionError::NotPublished)?;
                let export = provider.open(&name).map_err(SessionError::Open)?;
                let flags = transmission_flags(&export, &st);
                let mut out = Vec::new();
                ExportInfo {
                    size: export.size,
                    flags,
                }
                .encode_export_name_reply(no_zeroes, &mut out);
                io.write_all(&out).await?;
                io.flush().await?;
                let base_allocation = matches!(&st.meta, Some((n, true)) if *n == name);
                return Ok(Step::Done(Some(Negotiated {
                    export,
                    style: st.style(),
                    structured: st.structured,
                    base_allocation,
                    flags,
                    grant,
                })));
            }
            OptionRequest::Access(token) => match access.grants {
                None => send(io, &[OptionReply::ack(option)]).await?,
                Some(grants) => {
                    let found = grants.check(&token);
                    if found.is_empty() {
                        tracing::info!("access token refused: it names no grant on this server");
                        send(
                            io,
                            &[OptionReply::error(
                                option,
                                OptionError::Policy,
                                "access token not recognised (not published, or revoked)",
                            )],
                        )
                        .await?;
                    } else {
                        st.held.extend(found);
                        send(io, &[OptionReply::ack(option)]).await?;
                    }
                }
            },
            OptionRequest::Unknown { option: raw, .. } => {
                send(
                    io,
                    &[OptionReply::error(
                        option,
                        OptionError::Unsupported,
                        format!("option {raw} is not supported"),
                    )],
                )
                .await?;
            }
        }
    }
    tracing::warn!(
        limit = MAX_OPTIONS,
        "client sent too many options without picking an export; closing"
    );
    Err(SessionError::TooManyOptions(MAX_OPTIONS))
}
