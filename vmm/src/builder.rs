//! Building a VM from a [`VmConfig`], once, for boot and restore alike: KVM, guest RAM
//! from the pool, the VM, the snapshot engine, the devices (through the
//! [`DeviceManager`]), the kernel and initrd (boot only), then (in [`VmBuilder::build`]
//! or [`VmBuilder::build_for_restore`]) the command line, zero page, MP table and vCPUs.
//! Starting a built VM makes its [`Controller`], the one owner of the running VM's
//! control.
//!
//! ```no_run
//! # fn f(config: &vmm::config::VmConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use vmm::event_loop::EventLoop;
//! let mut event_loop = EventLoop::new()?;
//! let mut b = vmm::builder::VmBuilder::new(config, event_loop.stop_notifier()?)?;
//! // More devices go here: b.add_vsock(path, limits)?, or b.add_mmio_device(dev)? (address
//! // and IRQ) with b.vm().register_irqfd(&evt, slot.irq)? for its interrupt.
//! let vm = b.build()?;
//! let running = vm.start(&event_loop.stop_notifier()?)?; // vCPU threads run
//! let why = event_loop.run_until_stopped()?;
//! drop(running); // stops and joins the vCPU threads
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::bootparams::{self, InitrdPlacement};
use crate::arch::x86_64::layout::{self, *};
use crate::arch::x86_64::{cpuid, mptable};
use crate::config::{self, ConfigError, VmConfig};
use crate::controller::process::{GuestLimits, ProcessService};
use crate::controller::{Controller, ControllerParts, HostGrants, LiveVm, VmInfo, VmPersist};
pub use crate::device_manager::MmioSlot;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::serial::StdoutWriter;
use crate::devices::legacy::SerialDevice;
use crate::event_loop::Subscriber;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::engine::{lock_pool, Engine, EngineError};
use crate::snapshot::fault::HandlerOptions;
use crate::snapshot::lazy::{FillOptions, LazyFill, OnFatal, PageSource};
use crate::snapshot::protect::{ProtectError, UffdProtector};
use crate::stop::{StopNotifier, VmStop};
use crate::vstate::control::VcpuControl;
use crate::vstate::dirty::{DirtyError, DirtySource, VmmWriteLog};
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, Vcpus};
use crate::vstate::vm::{Vm, VmError};
use pmem_backend::{PageRun, Pool};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The lazy fill of a lazy restore could not be set up or started.
    #[error("cannot start the lazy fill of guest RAM: {0}")]
    LazyFill(#[source] std::io::Error),
    /// KVM is missing or unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The pool or guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Creating the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("kernel {0} is not a kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(String),
    /// linux-loader refused the kernel.
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad {
        /// Kernel path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Reading a file.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing boot data into guest memory.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
    /// The zero page.
    #[error(transparent)]
    BootParams(#[from] bootparams::BootParamsError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A device could not be created or wired.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A device could not be placed on the port-I/O bus.
    #[error("cannot place a device on the bus")]
    Bus(#[from] crate::devices::bus::BusError),
    /// The payload cannot be set up.
    #[error(transparent)]
    Payload(#[from] crate::payload::PayloadError),
    /// Guest RAM cannot be write-protected.
    #[error(transparent)]
    Protect(ProtectError),
    /// KVM dirty logging cannot be set up.
    #[error("cannot set up dirty logging")]
    Dirty(#[source] DirtyError),
    /// The snapshot engine did not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Where a lazy restore's RAM comes from, and how it is filled.
pub struct LazySpec {
    /// The pages.
    pub source: Arc<dyn PageSource>,
    /// Background fill or on demand only.
    pub options: FillOptions,
    /// The pages that are holes (a lazy copy back, see
    /// [`pmem_backend::Pool::copy_back_lazy`]); `None`: all of RAM (a new pool).
    pub missing: Option<Vec<PageRun>>,
}

impl std::fmt::Debug for LazySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazySpec")
            .field("source", &self.source.describe())
            .field("options", &self.options)
            .field(
                "missing",
                &self
                    .missing
                    .as_ref()
                    .map(|m| m.iter().map(|r| r.count).sum::<u64>()),
            )
            .finish()
    }
}

/// What a VM starts from.
enum Boot<'a> {
    /// Load the kernel (and initrd) named by the config.
    Linux,
    /// Run a user-mode payload (tests).
    Payload(&'a [u8]),
    /// Resume from a snapshot in this already opened pool (nothing is loaded).
    Restore(Box<Pool>),
}

/// The kernel as loaded.
#[derive(Debug, Clone, Copy)]
struct LoadedKernel {
    entry: u64,
    end: u64,
    header: Option<setup_header>,
}

/// A VM being assembled; see the module docs for the order of calls.
#[derive(Debug)]
pub struct VmBuilder {
    kvm: KvmContext,
    vm: Vm,
    vcpu_count: u8,
    mem_bytes: u64,
    cmdline: Cmdline,
    kernel: LoadedKernel,
    initrd: Option<InitrdPlacement>,
    /// Payload mode: the region (base, bytes) the payload's vCPUs work on.
    payload_region: Option<(u64, u64)>,
    devices: DeviceManager,
    engine: Arc<Engine>,
    grants: Arc<HostGrants>,
    pool_path: String,
}

fn read_mem_available() -> Option<u64> {
    config::parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_bytes: u64,
    initrd_size: u64,
) -> Result<LoadedKernel, BuildError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BuildError::Read {
        what: "kernel",
        path: p.clone(),
        source,
    })?;
    let too_small = |kernel_end| ConfigError::MemTooSmallForKernel {
        mem: mem_bytes,
        kernel_end,
        initrd_size,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                header: None,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {}
        Err(loader::Error::Elf(loader::elf::Error::ReadKernelImage)) => {
            // The headers parsed; writing a segment into guest RAM failed.
            let end = std::fs::read(path)
                .ok()
                .and_then(|b| config::elf_load_end(&b))
                .unwrap_or(0);
            return Err(too_small(end).into());
        }
        Err(e) => {
            return Err(BuildError::KernelLoad {
                path: p,
                reason: e.to_string(),
            })
        }
    }
    match BzImage::load(mem, None, &mut f, himem) {
        Ok(r) => {
            log::warn!(
                "{p} is a bzImage: its decompressor is slow under this host's emulation; an ELF vmlinux boots faster"
            );
            let header = r.setup_header;
            let init_size = header.map(|h| u64::from(h.init_size)).unwrap_or(0);
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end.max(r.kernel_load.0 + init_size),
                header,
            })
        }
        Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage))
        | Err(loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageHeader)) => {
            Err(BuildError::NotAKernel(p))
        }
        Err(loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel)) => {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            Err(too_small(HIMEM_START + size).into())
        }
        Err(e) => Err(BuildError::KernelLoad {
            path: p,
            reason: e.to_string(),
        }),
    }
}

impl VmBuilder {
    /// Check the host, create guest RAM in the pool, the VM, load kernel and initrd and
    /// add the serial port (console on stdout) and i8042. Reports a guest reset through
    /// `stop`.
    pub fn new(cfg: &VmConfig, stop: StopNotifier) -> Result<Self, BuildError> {
        Self::with_console(cfg, stop, Box::new(StdoutWriter))
    }

    /// Same as [`Self::new`] with the serial console's output going to `console`.
    pub fn with_console(
        cfg: &VmConfig,
        stop: StopNotifier,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, BuildError> {
        Self::create(cfg, stop, console, Boot::Linux, None)
    }

    /// Like [`VmBuilder::with_console`], but run `code` in guest user mode on every vCPU
    /// instead of booting Linux (see [`crate::payload`]); `cfg.kernel` names the payload.
    pub fn with_payload(
        cfg: &VmConfig,
        stop: StopNotifier,
        console: Box<dyn std::io::Write + Send>,
        code: &[u8],
    ) -> Result<Self, BuildError> {
        Self::create(cfg, stop, console, Boot::Payload(code), None)
    }

    /// Same as [`Self::with_console`] for a VM restored from a snapshot: guest RAM is the
    /// existing pool's, and no kernel, initrd or boot data is loaded (`cfg.kernel` and
    /// `cfg.initrd` are ignored). `pool` is the already opened (and locked) pool, of
    /// `cfg.mem_bytes` RAM. Finish with [`Self::build_for_restore`].
    pub fn for_restore(
        cfg: &VmConfig,
        stop: StopNotifier,
        console: Box<dyn std::io::Write + Send>,
        pool: Pool,
    ) -> Result<Self, BuildError> {
        Self::create(cfg, stop, console, Boot::Restore(Box::new(pool)), None)
    }

    /// A VM to restore lazily into `pool` (created with `lazy_ram`, its RAM still
    /// holes): guest RAM is registered for missing-page faults and filled from
    /// `lazy.source` ([`crate::snapshot::lazy`]). A page the source cannot give stops
    /// the VM with that error. Touched pages are served from the start; the background
    /// fill starts with [`RunningVm::start_prefault`].
    pub fn for_lazy_restore(
        cfg: &VmConfig,
        stop: StopNotifier,
        console: Box<dyn std::io::Write + Send>,
        pool: Pool,
        lazy: LazySpec,
    ) -> Result<Self, BuildError> {
        Self::create(
            cfg,
            stop,
            console,
            Boot::Restore(Box::new(pool)),
            Some(lazy),
        )
    }

    fn create(
        cfg: &VmConfig,
        stop: StopNotifier,
        console: Box<dyn std::io::Write + Send>,
        boot: Boot<'_>,
        lazy: Option<LazySpec>,
    ) -> Result<Self, BuildError> {
        config::validate_mem(cfg.mem_bytes)?;
        match &boot {
            Boot::Linux => {
                config::check_image_file("kernel", &cfg.kernel, false)?;
                if let Some(i) = &cfg.initrd {
                    config::check_image_file("initrd", i, false)?;
                }
            }
            Boot::Payload(_) => config::check_image_file("payload", &cfg.kernel, false)?,
            Boot::Restore(_) => {}
        }
        if cfg.vcpus == 0 {
            return Err(ConfigError::NoVcpus.into());
        }
        let (fs, fs_free) = memory::statfs_pool(&cfg.pool)?;
        memory::check_pool_filesystem(&cfg.pool, fs)?;
        if !matches!(boot, Boot::Restore(_)) {
            // A restored VM's RAM is already in the (existing) pool file.
            let available = read_mem_available().unwrap_or(u64::MAX);
            config::check_host_memory(cfg.mem_bytes, available, fs_free)?;
        }
        let t0 = std::time::Instant::now();
        let kvm = KvmContext::from_env()?;
        config::validate_vcpus(cfg.vcpus as usize, kvm.max_vcpus(), mptable::MAX_CPUS)?;
        let vcpu_count = u8::try_from(cfg.vcpus).expect("validate_vcpus caps the count at 254");

        let restoring = matches!(boot, Boot::Restore(_));
        let open =
            || memory::open_or_create_pool(&cfg.pool, cfg.mem_bytes, cfg.block_area, cfg.pool_node);
        let (pool, payload) = match boot {
            Boot::Restore(p) => (*p, None),
            Boot::Payload(code) => (open()?, Some(code)),
            Boot::Linux => (open()?, None),
        };
        let t1 = t0.elapsed();
        let mem = memory::create_guest_memory(pool.file(), pool.ram_offset(), cfg.mem_bytes)?;
        let t2 = t0.elapsed();
        let vm = Vm::new(&kvm, mem)?;
        let t3 = t0.elapsed();
        // The engine starts before anything is written into guest RAM: pages that
        // snapshots already in the pool reference are protected again first, so loading
        // the kernel preserves them instead of overwriting them.
        let lazy = match lazy {
            Some(spec) => Some((spec, stop.try_clone().map_err(BuildError::LazyFill)?)),
            None => None,
        };
        let engine = Self::start_engine(&vm, pool, lazy)?;
        log::debug!(
            "VM created: KVM (and the pool) opened after {t1:?}, guest RAM mapped after {t2:?}, VM and memslots after {t3:?}, engine after {:?}",
            t0.elapsed()
        );
        let devices = DeviceManager::new(&vm, console, stop)?;
        if restoring {
            return Ok(Self {
                kvm,
                vm,
                vcpu_count,
                mem_bytes: cfg.mem_bytes,
                // Unused (nothing is loaded), but devices still describe themselves on it.
                cmdline: Cmdline::new(4096).map_err(|e| ConfigError::Cmdline(e.to_string()))?,
                kernel: LoadedKernel {
                    entry: 0,
                    end: 0,
                    header: None,
                },
                initrd: None,
                payload_region: None,
                devices,
                engine,
                grants: Arc::new(HostGrants::default()),
                pool_path: cfg.pool.display().to_string(),
            });
        }

        let initrd_size = cfg
            .initrd
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        let (kernel, payload_region) = match payload {
            None => (
                load_kernel(vm.memory(), &cfg.kernel, cfg.mem_bytes, initrd_size)?,
                None,
            ),
            Some(code) => {
                crate::payload::write_setup(vm.memory(), cfg.mem_bytes, code)?;
                let region = crate::payload::region(cfg.mem_bytes, u64::from(vcpu_count))?;
                let kernel = LoadedKernel {
                    entry: crate::payload::CODE_ADDR,
                    end: crate::payload::CODE_ADDR + code.len() as u64,
                    header: None,
                };
                (kernel, Some(region))
            }
        };
        let initrd = match (&cfg.initrd, payload) {
            (_, Some(_)) => None,
            (Some(path), None) => Some(Self::load_initrd(&vm, path, cfg.mem_bytes, kernel.end)?),
            (None, None) => {
                config::place_initrd(
                    cfg.mem_bytes,
                    layout::low_ram_end(cfg.mem_bytes),
                    kernel.end,
                    0,
                )?;
                None
            }
        };

        Ok(Self {
            kvm,
            vm,
            vcpu_count,
            mem_bytes: cfg.mem_bytes,
            cmdline: config::build_cmdline(&cfg.extra_cmdline)?,
            kernel,
            initrd,
            payload_region,
            devices,
            engine,
            grants: Arc::new(HostGrants::default()),
            pool_path: cfg.pool.display().to_string(),
        })
    }

    fn start_engine(
        vm: &Vm,
        pool: Pool,
        lazy: Option<(LazySpec, StopNotifier)>,
    ) -> Result<Arc<Engine>, BuildError> {
        let maps: Vec<(*mut u8, usize)> = vm
            .memory()
            .iter()
            .map(|r| (r.as_ptr(), r.len() as usize))
            .collect();
        let protector = Arc::new(
            if lazy.is_some() {
                UffdProtector::with_ranges_lazy(&maps)
            } else {
                UffdProtector::with_ranges(&maps)
            }
            .map_err(BuildError::Protect)?,
        );
        let pool_path = pool.path().to_path_buf();
        let fill = lazy.map(|(spec, stop)| {
            let on_fatal: OnFatal = Box::new(move |msg| stop.notify(VmStop::Error(msg)));
            let (source, opts) = (spec.source, spec.options);
            let fill = match &spec.missing {
                None => LazyFill::new(protector.clone(), source, opts, on_fatal),
                Some(m) => LazyFill::new_partial(protector.clone(), source, opts, on_fatal, m),
            };
            fill.when_complete(Box::new(move || {
                if let Err(e) = pmem_backend::mark_ram_complete(&pool_path) {
                    log::warn!(
                        "every page is in, but the fill marker of {} stays: {e}",
                        pool_path.display()
                    );
                }
            }));
            fill
        });
        let sources: Vec<Box<dyn DirtySource>> = vec![
            Box::new(vm.dirty_log().map_err(BuildError::Dirty)?),
            Box::new(VmmWriteLog::new(vm.memory().clone())),
        ];
        if let Some(f) = &fill {
            // Before anything touches guest RAM (restoring vCPU state does).
            f.start_demand().map_err(BuildError::LazyFill)?;
        }
        let engine = Engine::start_with(
            Arc::new(Mutex::new(pool)),
            protector,
            sources,
            HandlerOptions::default(),
            fill,
        )?;
        Ok(Arc::new(engine))
    }

    fn load_initrd(
        vm: &Vm,
        path: &Path,
        mem: u64,
        kernel_end: u64,
    ) -> Result<InitrdPlacement, BuildError> {
        let read = |source| BuildError::Read {
            what: "initrd",
            path: path.display().to_string(),
            source,
        };
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(read)?;
        let size = data.len() as u64;
        let addr = config::place_initrd(mem, layout::low_ram_end(mem), kernel_end, size)?;
        vm.memory()
            .write_slice(&data, GuestAddress(addr))
            .map_err(|_| BuildError::GuestWrite("the initrd"))?;
        Ok(InitrdPlacement { addr, size })
    }

    /// The VM (for irqfds, ioeventfds, memslot flags).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// The snapshot engine (owns the pool).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The serial port (for the console input subscriber).
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.devices.serial().clone()
    }

    /// The port-I/O bus, to add more legacy devices before `build`.
    pub fn pio_bus_mut(&mut self) -> &mut Bus {
        self.devices.pio_bus_mut()
    }

    /// Give the guest a virtio-vsock device whose host side listens on `uds_path`, with
    /// the snapshot service for the guest agent on it (see [`DeviceManager::attach_vsock`]).
    /// Guest-owned snapshots stay within `limits`.
    pub fn add_vsock(&mut self, uds_path: &Path, limits: GuestLimits) -> Result<(), BuildError> {
        let service = ProcessService::new(
            self.engine.clone(),
            self.grants.clone(),
            self.mem_bytes,
            limits,
        );
        self.devices
            .attach_vsock(&self.vm, &mut self.cmdline, uds_path, service)?;
        Ok(())
    }

    /// The kernel command line, for devices that describe themselves on it.
    pub fn cmdline_mut(&mut self) -> &mut Cmdline {
        &mut self.cmdline
    }

    /// Place a virtio-mmio device: the next free `MMIO_DEVICE_SIZE` window in the 32-bit
    /// gap and the next free IRQ, added to the MMIO bus and announced on the kernel
    /// command line (`virtio_mmio.device=4K@0x...:IRQ`). Connect its interrupt with
    /// `vm().register_irqfd(&evt, slot.irq)`.
    pub fn add_mmio_device(&mut self, dev: SharedDevice) -> Result<MmioSlot, BuildError> {
        Ok(self.devices.add_mmio_device(&mut self.cmdline, dev)?)
    }

    /// Create vCPU `id`..`count` on the device manager's buses with this host's CPUID;
    /// `setup` finishes each (boot registers, payload entry, or nothing for a restore).
    fn create_vcpus(
        &mut self,
        mut setup: impl FnMut(&Vcpu, &CpuId) -> Result<(), BuildError>,
    ) -> Result<Vec<Vcpu>, BuildError> {
        let (pio, mmio) = self.devices.buses();
        let supported = self.kvm.supported_cpuid()?;
        let count = self.vcpu_count;
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            let v = Vcpu::new(&self.vm, id, pio.clone(), mmio.clone())?;
            setup(&v, &cpuid::for_vcpu(&supported, id, count))?;
            vcpus.push(v);
        }
        Ok(vcpus)
    }

    fn into_built(self, vcpus: Vec<Vcpu>) -> BuiltVm {
        BuiltVm {
            vm: self.vm,
            vcpus,
            engine: self.engine,
            grants: self.grants,
            devices: self.devices,
            info: VmInfo {
                mem_bytes: self.mem_bytes,
                pool_path: self.pool_path,
            },
        }
    }

    fn build_payload(mut self, (base, bytes): (u64, u64)) -> Result<BuiltVm, BuildError> {
        let count = self.vcpu_count;
        let vcpus = self.create_vcpus(|v, cpuid| {
            v.configure(cpuid, None)?;
            crate::payload::enter(v, u64::from(count), base, bytes)?;
            Ok(())
        })?;
        log::debug!(
            "payload VM built: {count} vCPUs, {} MiB, region {base:#x}+{bytes:#x}",
            self.mem_bytes >> 20
        );
        Ok(self.into_built(vcpus))
    }

    /// Write the command line, zero page and MP table, and create and configure the vCPUs.
    pub fn build(mut self) -> Result<BuiltVm, BuildError> {
        if let Some(region) = self.payload_region {
            return self.build_payload(region);
        }
        let mem = self.vm.memory();
        loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &self.cmdline)
            .map_err(|_| BuildError::GuestWrite("the kernel command line"))?;
        let cmdline_len = self
            .cmdline
            .as_cstring()
            .map_err(|e| ConfigError::Cmdline(e.to_string()))?
            .as_bytes_with_nul()
            .len();
        let params =
            bootparams::build(self.kernel.header, self.mem_bytes, cmdline_len, self.initrd)?;
        LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
            &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
            mem,
        )
        .map_err(|_| BuildError::GuestWrite("the zero page"))?;
        mptable::setup(mem, usize::from(self.vcpu_count))?;

        let entry = self.kernel.entry;
        let vcpus = self.create_vcpus(|v, cpuid| {
            v.configure(cpuid, (v.id() == 0).then_some(entry))?;
            Ok(())
        })?;
        log::debug!(
            "VM built: {} vCPUs, {} MiB, entry {:#x}, initrd {:?}, cmdline {:?}",
            self.vcpu_count,
            self.mem_bytes >> 20,
            self.kernel.entry,
            self.initrd,
            self.cmdline.as_cstring().ok()
        );
        Ok(self.into_built(vcpus))
    }

    /// For a VM being restored: create the vCPUs with this host's CPUID and nothing
    /// else. Writes nothing into guest RAM; the saved state goes in once the vCPU
    /// threads run, paused ([`BuiltVm::start_paused`], then
    /// [`Controller::restore_snapshot`]), the same way a rollback puts it back.
    pub fn build_for_restore(mut self) -> Result<BuiltVm, BuildError> {
        let vcpus = self.create_vcpus(|v, cpuid| {
            v.configure(cpuid, None)?;
            Ok(())
        })?;
        Ok(self.into_built(vcpus))
    }
}

/// A VM ready to run: configured vCPUs not yet started.
#[derive(Debug)]
pub struct BuiltVm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    engine: Arc<Engine>,
    grants: Arc<HostGrants>,
    devices: DeviceManager,
    info: VmInfo,
}

impl BuiltVm {
    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The snapshot engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Start one thread per vCPU.
    pub fn start(self, stop: &StopNotifier) -> Result<RunningVm, BuildError> {
        self.start_with(stop, false)
    }

    /// Start one thread per vCPU, paused: the guest runs from the first `resume`
    /// (a restore puts the saved state in first).
    pub fn start_paused(self, stop: &StopNotifier) -> Result<RunningVm, BuildError> {
        self.start_with(stop, true)
    }

    fn start_with(self, stop: &StopNotifier, paused: bool) -> Result<RunningVm, BuildError> {
        let vcpus = Arc::new(if paused {
            VcpuControl::new_paused(Vcpus::start_paused(self.vcpus, stop)?)
        } else {
            VcpuControl::new(Vcpus::start(self.vcpus, stop)?)
        });
        let vm = Arc::new(self.vm);
        // Without KVM's MSR list, VM snapshots are refused with a clear error and the
        // VM still runs.
        let live: Option<Arc<dyn VmPersist>> = match LiveVm::new(
            vcpus.clone(),
            vm.clone(),
            self.devices.serial().clone(),
            self.info.mem_bytes,
            self.devices.virtio_slots().to_vec(),
        ) {
            Ok(live) => Some(Arc::new(live)),
            Err(e) => {
                log::warn!("VM snapshots unavailable: {e}");
                None
            }
        };
        let controller = Arc::new(Controller::new(ControllerParts {
            engine: self.engine.clone(),
            grants: self.grants,
            vm: vcpus.clone(),
            live,
            agent_uds: self.devices.agent_uds().map(Path::to_path_buf),
            info: self.info,
        }));
        // Only once the vCPUs run, so that it does not compete with getting them
        // running; a restore starts it after its state is in
        // ([`RunningVm::start_prefault`]). A newly created pool started it already.
        if !paused {
            lock_pool(self.engine.pool()).start_prefault();
        }
        Ok(RunningVm {
            vcpus,
            vm,
            engine: self.engine,
            controller,
            devices: self.devices,
        })
    }
}

/// A running VM. Stopping it stops and joins the vCPU threads first; then the VM, its
/// memory, the devices (removing the vsock's host socket) and the engine go.
#[derive(Debug)]
pub struct RunningVm {
    vcpus: Arc<VcpuControl>,
    vm: Arc<Vm>,
    engine: Arc<Engine>,
    controller: Arc<Controller>,
    devices: DeviceManager,
}

impl RunningVm {
    /// Start the pool's background pre-fault of metadata and blocks (at nice 19). A VM
    /// started paused for a restore calls this once the snapshot is in: on this
    /// machine's two cores, the thread competing for the CPUs and the mmap lock made a
    /// restore to running vCPUs take 20-30 ms instead of 11-15 ms (1 GiB).
    ///
    /// A lazily restored VM starts its read-ahead and background fill here too, once its
    /// vCPUs run (touched pages are served from the start, see `start_engine`).
    pub fn start_prefault(&self) -> Result<(), BuildError> {
        if let Some(fill) = self.engine.lazy() {
            fill.start_ahead().map_err(BuildError::LazyFill)?;
        }
        lock_pool(self.engine.pool()).start_prefault();
        Ok(())
    }

    /// Let the vCPUs of a VM started paused run (the end of `pmsnap restore`), without
    /// waiting for each to acknowledge ([`Vcpus::release`]).
    pub fn run_vcpus(&self) -> Result<(), BuildError> {
        Ok(self.vcpus.release()?)
    }

    /// The vCPU threads (pause / resume).
    pub fn vcpus(&self) -> std::sync::MutexGuard<'_, Vcpus> {
        self.vcpus.vcpus()
    }

    /// The VM (memory, KVM fd).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The snapshot engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The controller: the API's handler, VM snapshots, rollback and restore.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// The serial port (console input).
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.devices.serial().clone()
    }

    /// The devices the event loop must serve, handed over once.
    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        self.devices.take_subscribers()
    }

    /// Stop and join the vCPU threads.
    pub fn stop(&mut self) {
        self.vcpus.vcpus().stop();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        // The vCPU threads end before the VM and its memory go.
        self.stop();
    }
}
