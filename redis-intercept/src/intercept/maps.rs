//! The programs' maps: settings, the services' VIPs (v4 and v6, with the listener each goes
//! to), the proxy's own addresses, and the per-CPU counters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use redis_intercept_common as common;
use tracing::warn;

use super::{InterceptError, Interceptor, Vip, ebpf_err};

impl Interceptor {
    pub(super) fn write_settings(&mut self) -> Result<(), InterceptError> {
        let mut pod_ip4 = 0;
        let mut pod_ip6 = [0; 4];
        for ip in &self.plan.pod_addresses {
            match ip {
                IpAddr::V4(v4) => pod_ip4 = common::ip4_word(v4.octets()),
                IpAddr::V6(v6) => pod_ip6 = common::ip6_words(v6.octets()),
            }
        }
        let settings = common::Settings {
            default_policy: if self.plan.default_on {
                common::POLICY_ON
            } else {
                common::POLICY_OFF
            },
            proxy_mark: common::PROXY_SO_MARK,
            pod_ip4,
            pod_ip6,
            rmem_offset: self.rmem_offset,
            backlog_limit: self.plan.backlog_limit,
        };
        let mut map: Array<&mut MapData, common::Settings> = Array::try_from(
            self.ebpf
                .map_mut(common::SETTINGS_MAP)
                .ok_or_else(|| InterceptError::Ebpf("settings map missing".to_owned()))?,
        )
        .map_err(|e| ebpf_err("settings map", e))?;
        map.set(0, settings, 0)
            .map_err(|e| ebpf_err("write settings", e))
    }

    /// Replaces the VIPs in the services maps with `vips`.
    ///
    /// # Errors
    /// A VIP whose family differs from its listener's, or a map write the kernel refused.
    pub fn set_vips(&mut self, vips: &[Vip]) -> Result<(), InterceptError> {
        for v in vips {
            if v.vip.is_ipv4() != v.listener.is_ipv4() {
                return Err(InterceptError::Ebpf(format!(
                    "VIP {} and its service listener {} are of different address families",
                    v.vip, v.listener
                )));
            }
        }
        let old = std::mem::take(&mut self.vips);
        for v in &old {
            if !vips.iter().any(|n| n.vip == v.vip) {
                self.remove_vip(v.vip)?;
            }
        }
        for v in vips {
            self.insert_vip(v)?;
        }
        self.vips = vips.to_vec();
        if self.plan.accelerate {
            self.set_proxy_addrs()?;
        }
        Ok(())
    }

    /// Writes the addresses redirected connects go to (each listener's host and pod address)
    /// into the proxy addresses map, and removes the ones no VIP goes to any more.
    pub(super) fn set_proxy_addrs(&mut self) -> Result<(), InterceptError> {
        let mut want = Vec::new();
        for v in &self.vips {
            let port = u32::from(v.listener.port());
            let mut ips = vec![host_target(v.listener.ip())];
            ips.extend(
                self.plan
                    .pod_addresses
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v.listener.is_ipv4()),
            );
            for ip in ips {
                want.push(common::ProxyAddr {
                    ip: mapped_words(ip),
                    port,
                });
            }
        }
        let mut map: HashMap<&mut MapData, common::ProxyAddr, u32> =
            self.hash_map(common::PROXY_ADDRS_MAP)?;
        let stale: Vec<common::ProxyAddr> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(k))
            .collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        for k in want {
            map.insert(k, 1, 0)
                .map_err(|e| ebpf_err("write the proxy addresses map", e))?;
        }
        Ok(())
    }

    /// Warns when this process runs outside the attach cgroup: the proxy's ends of connections
    /// are then never paired, and every connection keeps using TCP.
    pub(super) fn warn_if_outside(&self) {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            });
        let Some(own) = own else {
            return;
        };
        let own = self.mount.join(own.trim_start_matches('/'));
        if !own.starts_with(&self.plan.attach) {
            warn!(
                proxy_cgroup = %own.display(),
                attach = %self.plan.attach.display(),
                "[intercept] accelerate: the proxy runs outside the attach cgroup, so its sockets can't be paired; connections use TCP"
            );
        }
    }

    pub(super) fn insert_vip(&mut self, v: &Vip) -> Result<(), InterceptError> {
        let port = common::port_word(v.listener.port());
        let host = host_target(v.listener.ip());
        let value = common::ServiceValue {
            host_ip4: match host {
                IpAddr::V4(ip) => common::ip4_word(ip.octets()),
                IpAddr::V6(_) => 0,
            },
            host_ip6: match host {
                IpAddr::V6(ip) => common::ip6_words(ip.octets()),
                IpAddr::V4(_) => [0; 4],
            },
            port,
            service: v.service,
            flags: 0,
        };
        match v.vip {
            SocketAddr::V4(vip) => {
                let mut map = self.v4_map()?;
                let key = common::ServiceKeyV4 {
                    ip: common::ip4_word(vip.ip().octets()),
                    port: common::port_word(vip.port()),
                };
                map.insert(key, value, 0)
                    .map_err(|e| ebpf_err("write the IPv4 services map", e))
            }
            SocketAddr::V6(vip) => {
                let mut map = self.v6_map()?;
                let key = common::ServiceKeyV6 {
                    ip: common::ip6_words(vip.ip().octets()),
                    port: common::port_word(vip.port()),
                };
                map.insert(key, value, 0)
                    .map_err(|e| ebpf_err("write the IPv6 services map", e))
            }
        }
    }

    pub(super) fn remove_vip(&mut self, vip: SocketAddr) -> Result<(), InterceptError> {
        let result = match vip {
            SocketAddr::V4(vip) => self.v4_map()?.remove(&common::ServiceKeyV4 {
                ip: common::ip4_word(vip.ip().octets()),
                port: common::port_word(vip.port()),
            }),
            SocketAddr::V6(vip) => self.v6_map()?.remove(&common::ServiceKeyV6 {
                ip: common::ip6_words(vip.ip().octets()),
                port: common::port_word(vip.port()),
            }),
        };
        result.map_err(|e| ebpf_err("remove a VIP", e))
    }

    pub(super) fn v4_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, common::ServiceKeyV4, common::ServiceValue>, InterceptError>
    {
        self.hash_map(common::SERVICES_V4_MAP)
    }

    pub(super) fn v6_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, common::ServiceKeyV6, common::ServiceValue>, InterceptError>
    {
        self.hash_map(common::SERVICES_V6_MAP)
    }

    /// The hash map `name` of the object.
    pub(super) fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>, InterceptError> {
        HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or_else(|| InterceptError::Ebpf(format!("map {name} missing")))?,
        )
        .map_err(|e| ebpf_err(name, e))
    }

    /// The counters, summed over CPUs: redirected, skipped by mark, skipped by policy,
    /// skipped for want of a pod address, paired sockets, spliced writes, unpaired sockets,
    /// sockets sent through TCP because their reader was backlogged.
    ///
    /// # Errors
    /// The counters map can't be read.
    pub fn counters(&self) -> Result<[u64; common::COUNTERS as usize], InterceptError> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(common::COUNTERS_MAP)
                .ok_or_else(|| InterceptError::Ebpf("counters map missing".to_owned()))?,
        )
        .map_err(|e| ebpf_err("counters map", e))?;
        let mut out = [0u64; common::COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = map
                .get(&(i as u32), 0)
                .map_err(|e| ebpf_err("read counters", e))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}

/// Where host processes' connects to a VIP of a listener on `ip` go: the listener's address,
/// or loopback for a wildcard listener.
pub(super) fn host_target(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// An address as the pairing programs key it: IPv6 words, IPv4 mapped.
pub(super) fn mapped_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => common::v4_mapped(common::ip4_word(v4.octets())),
        IpAddr::V6(v6) => common::ip6_words(v6.octets()),
    }
}
