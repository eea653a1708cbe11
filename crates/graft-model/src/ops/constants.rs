//! Tensors that depend on sizes only, made once per device and kept there: made on the host
//! for each step, each would be uploaded for each step.
use candle_core::{Device, Result, Tensor};
use std::sync::Mutex;

/// The shortest table [`arange`] makes: dropout's counters use 2^16 at once.
const SHORTEST: usize = 1 << 16;

/// `0..n` (u32) on `device`: a view of one table per device, kept across calls and made
/// again, twice as long, when a longer one is asked for.
pub fn arange(n: usize, device: &Device) -> Result<Tensor> {
    static TABLES: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());
    if n > u32::MAX as usize {
        candle_core::bail!("a range of {n} does not fit u32");
    }
    let mut tables = TABLES
        .lock()
        .map_err(|_| candle_core::Error::Msg("the table of ranges is poisoned".into()))?;
    let at = tables.iter().position(|t| t.device().same_device(device));
    match at {
        Some(i) if tables[i].dim(0)? >= n => return tables[i].narrow(0, 0, n),
        Some(i) => {
            tables.swap_remove(i);
        }
        None => {}
    }
    let len = n.next_power_of_two().clamp(SHORTEST, u32::MAX as usize);
    let table = Tensor::arange(0u32, len as u32, device)?;
    let view = table.narrow(0, 0, n)?;
    tables.push(table);
    Ok(view)
}

/// Which keys each query sees under a causal mask, `[tq, tk]` u8: 1 where key `j <= i + tk -
/// tq` (the leading `tk - tq` keys, prefixes or cached positions, are seen by every query).
/// One comparison on the device, of views of [`arange`].
pub fn causal_visibility(tq: usize, tk: usize, device: &Device) -> Result<Tensor> {
    if tk < tq {
        candle_core::bail!("a causal mask of {tq} queries over {tk} keys");
    }
    let keys = arange(tk, device)?;
    let queries = keys.narrow(0, tk - tq, tq)?.reshape((tq, 1))?;
    keys.reshape((1, tk))?.broadcast_le(&queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views are `0..n` before and after the table grows, and the mask is the one the host
    /// built before (`j <= i + tk - tq`) with and without leading keys.
    #[test]
    fn ranges_and_causal_masks_match_the_host() {
        let device = Device::Cpu;
        for n in [0, 5, SHORTEST + 3, 7] {
            let got = arange(n, &device).unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(got, (0..n as u32).collect::<Vec<_>>());
        }
        for (tq, tk) in [(1, 1), (4, 4), (3, 7), (1, 9)] {
            let host: Vec<Vec<u8>> = (0..tq)
                .map(|i| (0..tk).map(|j| u8::from(j <= i + tk - tq)).collect())
                .collect();
            let got = causal_visibility(tq, tk, &device).unwrap();
            assert_eq!(
                got.to_vec2::<u8>().unwrap(),
                host,
                "{tq} queries, {tk} keys"
            );
        }
        assert!(causal_visibility(3, 2, &device).is_err());
    }
}
