//! The test cluster's DNS (`enbd-dns`): the A records a pod needs to reach Services and the
//! pods of headless Services, built from Services and EndpointSlices, and the DNS wire format
//! to answer them (RFC 1035: one question per query, A answers, authoritative for the cluster
//! domain only — the cluster has no upstream resolver, so every other name is NXDOMAIN).
//!
//! Names served, under `<domain>` (`cluster.local`):
//! - `<svc>.<ns>.svc.<domain>`: the ClusterIP, or for a headless Service the addresses of its
//!   ready endpoints (all of them when it publishes not-ready addresses);
//! - `<hostname>.<svc>.<ns>.svc.<domain>`: an endpoint with a hostname (the pods of a
//!   StatefulSet whose serviceName is the headless Service `<svc>`).
//!
//! Names that lie above a record (`<ns>.svc.<domain>`) answer NOERROR without records, so a
//! resolver walking its search path is not told they do not exist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// TTL of every answer: short, so a test sees a new Service within seconds.
pub const TTL_SECS: u32 = 5;
/// The largest UDP response without EDNS (RFC 1035 §4.2.1).
pub const UDP_LIMIT: usize = 512;

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// The A records of the cluster domain.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Zone {
    domain: String,
    records: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// Every name that is a proper ancestor of a record, inside the domain.
    ancestors: BTreeSet<String>,
}

impl Zone {
    /// The records of these Services and EndpointSlices under `domain` (e.g. `cluster.local`).
    pub fn build(domain: &str, services: &[Service], slices: &[EndpointSlice]) -> Zone {
        let domain = normalize(domain);
        let mut zone = Zone {
            domain: domain.clone(),
            ..Zone::default()
        };
        for svc in services {
            let (Some(name), Some(ns)) = (&svc.metadata.name, &svc.metadata.namespace) else {
                continue;
            };
            let Some(spec) = &svc.spec else { continue };
            let fqdn = format!(
                "{}.{}.svc.{domain}",
                name.to_ascii_lowercase(),
                ns.to_ascii_lowercase()
            );
            let cluster_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
                (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
                (_, Some(ip)) => vec![ip],
                _ => Vec::new(),
            };
            let headless = cluster_ips.iter().any(|ip| ip.as_str() == "None");
            if !headless {
                for ip in cluster_ips
                    .iter()
                    .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
                {
                    zone.add(&fqdn, ip);
                }
                // A ClusterIP Service with only IPv6 addresses still exists: NOERROR, no A.
                zone.add_name(&fqdn);
                continue;
            }
            zone.add_name(&fqdn);
            let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
            for slice in slices.iter().filter(|s| belongs_to(s, ns, name)) {
                if slice.address_type != "IPv4" {
                    continue;
                }
                for ep in slice.endpoints.iter().flatten() {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if !ready && !publish_not_ready {
                        continue;
                    }
                    for ip in ep
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                    {
                        zone.add(&fqdn, ip);
                        if let Some(host) = &ep.hostname {
                            zone.add(&format!("{}.{fqdn}", host.to_ascii_lowercase()), ip);
                        }
                    }
                }
            }
        }
        zone
    }

    fn add_name(&mut self, fqdn: &str) {
        self.records.entry(fqdn.to_string()).or_default();
        let mut rest = fqdn;
        while let Some((_, parent)) = rest.split_once('.') {
            if !in_domain(parent, &self.domain) {
                break;
            }
            self.ancestors.insert(parent.to_string());
            rest = parent;
        }
    }

    fn add(&mut self, fqdn: &str, ip: Ipv4Addr) {
        self.add_name(fqdn);
        self.records.entry(fqdn.to_string()).or_default().insert(ip);
    }

    /// What this zone says about `name` (any case, trailing dot or not).
    pub fn lookup(&self, name: &str) -> Lookup {
        let name = normalize(name);
        match self.records.get(&name) {
            Some(ips) => Lookup::Found(ips.iter().copied().collect()),
            None if self.ancestors.contains(&name) || name == self.domain => {
                Lookup::Found(Vec::new())
            }
            None => Lookup::NoSuchName,
        }
    }
}

fn belongs_to(slice: &EndpointSlice, ns: &str, service: &str) -> bool {
    slice.metadata.namespace.as_deref() == Some(ns)
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .is_some_and(|s| s == service)
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn in_domain(name: &str, domain: &str) -> bool {
    name == domain || name.strip_suffix(domain).is_some_and(|p| p.ends_with('.'))
}

/// A name's state in the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The name exists; its A records (possibly none).
    Found(Vec<Ipv4Addr>),
    /// NXDOMAIN.
    NoSuchName,
}

/// Why a packet got no answer at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("packet shorter than a DNS header")]
    TooShort,
    #[error("the packet is a response, not a query")]
    NotAQuery,
}

/// A parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question's bytes as they came (echoed in the response).
    raw: Vec<u8>,
}

/// Reads the question of a query that starts at byte 12; `None` if it is malformed.
fn parse_question(packet: &[u8]) -> Option<Question> {
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        // Compression pointers and extended label types have no place in a question.
        if len > 63 {
            return None;
        }
        let label = packet.get(pos..pos + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += len;
        if pos - 12 > 255 {
            return None;
        }
    }
    let fixed = packet.get(pos..pos + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    Some(Question {
        name: labels.join("."),
        qtype,
        qclass,
        raw: packet[12..pos + 4].to_vec(),
    })
}

/// The response to one query packet, at most `limit` bytes long (answers that do not fit set
/// the TC bit, so the client retries over TCP). Errors: packets that get no response at all.
pub fn answer(zone: &Zone, packet: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    if packet.len() < 12 {
        return Err(WireError::TooShort);
    }
    if packet[2] & 0x80 != 0 {
        return Err(WireError::NotAQuery);
    }
    let id = [packet[0], packet[1]];
    let opcode = (packet[2] >> 3) & 0x0f;
    let rd = packet[2] & 0x01;
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    let header = |rcode: u8, aa: bool, tc: bool, qd: u16, an: u16| {
        let mut h = Vec::with_capacity(12);
        h.extend_from_slice(&id);
        h.push(0x80 | (opcode << 3) | (u8::from(aa) << 2) | (u8::from(tc) << 1) | rd);
        h.push(rcode);
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&an.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    };
    if opcode != 0 {
        return Ok(header(RCODE_NOTIMP, false, false, 0, 0));
    }
    let question = match (qdcount, parse_question(packet)) {
        (1, Some(q)) => q,
        _ => return Ok(header(RCODE_FORMERR, false, false, 0, 0)),
    };
    let ips = match zone.lookup(&question.name) {
        Lookup::NoSuchName => {
            let mut out = header(RCODE_NXDOMAIN, true, false, 1, 0);
            out.extend_from_slice(&question.raw);
            return Ok(out);
        }
        Lookup::Found(ips)
            if question.qclass == CLASS_IN && matches!(question.qtype, TYPE_A | TYPE_ANY) =>
        {
            ips
        }
        Lookup::Found(_) => Vec::new(),
    };
    const RECORD_LEN: usize = 16; // pointer 2 + type 2 + class 2 + ttl 4 + rdlength 2 + 4
    let room = limit.saturating_sub(12 + question.raw.len()) / RECORD_LEN;
    let truncated = ips.len() > room;
    let ips = if truncated { &ips[..0] } else { &ips[..] };
    let count = u16::try_from(ips.len()).unwrap_or(u16::MAX);
    let mut out = header(0, true, truncated, 1, count);
    out.extend_from_slice(&question.raw);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name, at offset 12
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn service(ns: &str, name: &str, cluster_ip: &str, publish_not_ready: bool) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                cluster_ips: Some(vec![cluster_ip.into()]),
                publish_not_ready_addresses: Some(publish_not_ready),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn slice(ns: &str, service: &str, endpoints: &[(&str, Option<&str>, bool)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-abcde")),
                namespace: Some(ns.into()),
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_string(),
                        service.to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, host, ready)| Endpoint {
                        addresses: vec![(*ip).into()],
                        hostname: host.map(Into::into),
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: None,
        }
    }

    fn zone() -> Zone {
        Zone::build(
            "cluster.local",
            &[
                service("default", "kubernetes", "10.96.0.1", false),
                service("enbd", "enbd-server", "None", false),
                service("enbd", "warm", "None", true),
            ],
            &[
                slice(
                    "enbd",
                    "enbd-server",
                    &[
                        ("10.244.0.7", Some("enbd-server-0"), true),
                        ("10.244.0.8", Some("enbd-server-1"), false),
                    ],
                ),
                slice("enbd", "warm", &[("10.244.0.9", Some("warm-0"), false)]),
                // Same service name in another namespace: not ours.
                slice(
                    "other",
                    "enbd-server",
                    &[("10.244.0.99", Some("enbd-server-0"), true)],
                ),
            ],
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn cluster_ip_service_resolves_to_its_cluster_ip() {
        assert_eq!(
            zone().lookup("kubernetes.default.svc.cluster.local"),
            Lookup::Found(vec![ip("10.96.0.1")])
        );
        assert_eq!(
            zone().lookup("Kubernetes.Default.SVC.cluster.local."),
            Lookup::Found(vec![ip("10.96.0.1")])
        );
    }

    #[test]
    fn headless_service_resolves_to_ready_endpoints_and_pod_hostnames() {
        let z = zone();
        assert_eq!(
            z.lookup("enbd-server.enbd.svc.cluster.local"),
            Lookup::Found(vec![ip("10.244.0.7")])
        );
        assert_eq!(
            z.lookup("enbd-server-0.enbd-server.enbd.svc.cluster.local"),
            Lookup::Found(vec![ip("10.244.0.7")])
        );
        // Not ready and the Service does not publish not-ready addresses.
        assert_eq!(
            z.lookup("enbd-server-1.enbd-server.enbd.svc.cluster.local"),
            Lookup::NoSuchName
        );
        // publishNotReadyAddresses: the pod resolves before it is ready.
        assert_eq!(
            z.lookup("warm-0.warm.enbd.svc.cluster.local"),
            Lookup::Found(vec![ip("10.244.0.9")])
        );
    }

    #[test]
    fn unknown_names_do_not_exist_but_ancestors_do() {
        let z = zone();
        assert_eq!(
            z.lookup("nope.default.svc.cluster.local"),
            Lookup::NoSuchName
        );
        assert_eq!(
            z.lookup("kubernetes.default.svc.cluster.local.default.svc.cluster.local"),
            Lookup::NoSuchName
        );
        assert_eq!(z.lookup("example.org"), Lookup::NoSuchName);
        assert_eq!(z.lookup("enbd.svc.cluster.local"), Lookup::Found(vec![]));
        assert_eq!(z.lookup("svc.cluster.local"), Lookup::Found(vec![]));
        assert_eq!(z.lookup("cluster.local"), Lookup::Found(vec![]));
    }

    /// A query as a stub resolver sends it: id, RD, one question, optionally an EDNS OPT.
    fn query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        if edns {
            q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        q
    }

    /// (id, flags, rcode, qdcount, ancount, answers' addresses) of a response.
    fn parse(resp: &[u8]) -> (u16, u8, u8, u16, u16, Vec<Ipv4Addr>) {
        let id = u16::from_be_bytes([resp[0], resp[1]]);
        let qd = u16::from_be_bytes([resp[4], resp[5]]);
        let an = u16::from_be_bytes([resp[6], resp[7]]);
        let mut pos = 12;
        if qd == 1 {
            while resp[pos] != 0 {
                pos += resp[pos] as usize + 1;
            }
            pos += 5;
        }
        let mut ips = Vec::new();
        for _ in 0..an {
            assert_eq!(&resp[pos..pos + 2], &[0xc0, 0x0c]);
            assert_eq!(&resp[pos + 2..pos + 4], &TYPE_A.to_be_bytes());
            assert_eq!(&resp[pos + 6..pos + 10], &TTL_SECS.to_be_bytes());
            assert_eq!(&resp[pos + 10..pos + 12], &4u16.to_be_bytes());
            ips.push(Ipv4Addr::new(
                resp[pos + 12],
                resp[pos + 13],
                resp[pos + 14],
                resp[pos + 15],
            ));
            pos += 16;
        }
        assert_eq!(pos, resp.len(), "trailing bytes");
        (id, resp[2], resp[3] & 0x0f, qd, an, ips)
    }

    #[test]
    fn a_query_gets_the_address_with_the_id_and_question_echoed() {
        let q = query(0xbeef, "kubernetes.default.svc.cluster.local", TYPE_A, true);
        let r = answer(&zone(), &q, UDP_LIMIT).unwrap();
        let (id, flags, rcode, qd, an, ips) = parse(&r);
        assert_eq!((id, rcode, qd, an), (0xbeef, 0, 1, 1));
        assert_eq!(flags, 0x85, "QR, AA, RD");
        assert_eq!(ips, vec![ip("10.96.0.1")]);
        let qlen = q.len() - 12 - 11; // without the OPT record
        assert_eq!(&r[12..12 + qlen], &q[12..12 + qlen]);
    }

    #[test]
    fn aaaa_for_a_known_name_is_an_empty_noerror_and_unknown_is_nxdomain() {
        let r = answer(
            &zone(),
            &query(1, "kubernetes.default.svc.cluster.local", 28, false),
            UDP_LIMIT,
        )
        .unwrap();
        assert_eq!(parse(&r).2, 0);
        assert_eq!(parse(&r).4, 0);
        let r = answer(
            &zone(),
            &query(2, "nope.default.svc.cluster.local", TYPE_A, false),
            UDP_LIMIT,
        )
        .unwrap();
        let (_, flags, rcode, qd, an, _) = parse(&r);
        assert_eq!((rcode, qd, an), (RCODE_NXDOMAIN, 1, 0));
        assert_eq!(flags & 0x04, 0x04, "authoritative");
    }

    #[test]
    fn too_many_answers_for_udp_set_tc() {
        let endpoints: Vec<(String, Option<&str>, bool)> = (0..40)
            .map(|i| (format!("10.244.0.{}", i + 10), None, true))
            .collect();
        let eps: Vec<(&str, Option<&str>, bool)> = endpoints
            .iter()
            .map(|(a, h, r)| (a.as_str(), *h, *r))
            .collect();
        let z = Zone::build(
            "cluster.local",
            &[service("big", "many", "None", false)],
            &[slice("big", "many", &eps)],
        );
        let q = query(3, "many.big.svc.cluster.local", TYPE_A, false);
        let (_, flags, rcode, _, an, _) = parse(&answer(&z, &q, UDP_LIMIT).unwrap());
        assert_eq!((flags & 0x02, rcode, an), (0x02, 0, 0));
        let (_, flags, _, _, an, ips) = parse(&answer(&z, &q, 65535).unwrap());
        assert_eq!((flags & 0x02, an, ips.len()), (0, 40, 40));
    }

    #[test]
    fn malformed_and_odd_packets() {
        assert_eq!(
            answer(&zone(), &[0; 5], UDP_LIMIT),
            Err(WireError::TooShort)
        );
        let mut resp = query(4, "a.b", TYPE_A, false);
        resp[2] |= 0x80;
        assert_eq!(answer(&zone(), &resp, UDP_LIMIT), Err(WireError::NotAQuery));
        // A question cut short: FORMERR, no question echoed.
        let q = query(5, "kubernetes.default.svc.cluster.local", TYPE_A, false);
        let r = answer(&zone(), &q[..20], UDP_LIMIT).unwrap();
        assert_eq!(parse(&r).2, RCODE_FORMERR);
        // A compression pointer in the question.
        let mut q = query(6, "x", TYPE_A, false);
        q[12] = 0xc0;
        assert_eq!(
            parse(&answer(&zone(), &q, UDP_LIMIT).unwrap()).2,
            RCODE_FORMERR
        );
        // Opcode 2 (status): not implemented.
        let mut q = query(7, "x", TYPE_A, false);
        q[2] = 0x10;
        assert_eq!(
            parse(&answer(&zone(), &q, UDP_LIMIT).unwrap()).2,
            RCODE_NOTIMP
        );
    }
}
