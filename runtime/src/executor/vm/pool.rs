//! The warm pool: the template made once, clones restored, warmed and paused ahead of
//! the jobs that take them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::anyhow;

use super::Inner;
use super::clone::Vm;
use super::template::{Template, check};

impl Inner {
    /// The template, booted and snapshotted on first use (or found in the cache).
    pub(super) async fn template(self: &Arc<Self>) -> anyhow::Result<Arc<Template>> {
        self.template
            .get_or_try_init(|| async {
                check(&self.config).map_err(|e| anyhow!("{e}"))?;
                let this = self.clone();
                let template = tokio::spawn(async move { this.make_template().await }).await??;
                Ok(Arc::new(template))
            })
            .await
            .cloned()
    }

    /// A clone ready for a job: from the pool, else restored now. Refills the pool.
    pub(super) async fn acquire(self: &Arc<Self>) -> anyhow::Result<Vm> {
        let template = self.template().await?;
        let pooled = self.pool.lock().unwrap().pop_front();
        let vm = match pooled {
            Some(vm) => vm,
            None => Vm::restore(self, &template).await?,
        };
        self.refill();
        Ok(vm)
    }

    /// Tops the pool up in the background (one filler at a time).
    pub(super) fn refill(self: &Arc<Self>) {
        if self.config.pool_size == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            while this.pool.lock().unwrap().len() < this.config.pool_size {
                let made = async {
                    let template = this.template().await?;
                    let mut vm = Vm::restore(&this, &template).await?;
                    vm.warm().await?;
                    Ok::<_, anyhow::Error>(vm)
                };
                match made.await {
                    Ok(vm) => this.pool.lock().unwrap().push_back(vm),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "filling the vm pool failed");
                        break;
                    }
                }
            }
            this.filling.store(false, Ordering::Release);
        });
    }
}
